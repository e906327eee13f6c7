"""Images side by side with their condition and prompt: validation grids, and the report's sheets."""

from __future__ import annotations

from PIL import Image, ImageDraw


def make_grid(rows: list[tuple[Image.Image, list[Image.Image], str]], caption_height: int = 14) -> Image.Image:
    """One row per (condition, samples, prompt): condition | samples, prompt written underneath."""
    size = rows[0][0].size[0]
    columns = 1 + max(len(samples) for _, samples, _ in rows)
    grid = Image.new("RGB", (columns * size, len(rows) * (size + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (condition, samples, prompt) in enumerate(rows):
        y = r * (size + caption_height)
        for c, image in enumerate([condition, *samples]):
            grid.paste(image.convert("RGB").resize((size, size)), (c * size, y))
        draw.text((2, y + size + 1), prompt[: columns * size // 6], fill="black")
    return grid
