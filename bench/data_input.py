"""Data input cost: listing/checking a 50k-row imagefolder, and per-sample load + transform at 512, one thread
(as in a DataLoader worker). Figures are the best of 5 runs: other load on the machine only adds.

Run: PYTHONPATH=. .venv/bin/python bench/data_input.py   (prints figures; writes only to a temp folder)
"""

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zeroconv.config import TrainConfig
from zeroconv.data.dataset import ControlNetDataset
from zeroconv.data.sources import check_data_args, load_examples
from zeroconv.data.transforms import PairedTransform


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(rows: int = 50_000, samples: int = 10):
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # the listing cost does not depend on image size: copies of one small file stand in for 2 x 50k images
        Image.new("RGB", (8, 8)).save(root / "seed.png")
        seed = (root / "seed.png").read_bytes()
        (root / "conditioning").mkdir()
        with open(root / "metadata.jsonl", "w") as fh:
            for i in range(rows):
                (root / f"{i}.png").write_bytes(seed)
                (root / "conditioning" / f"{i}.png").write_bytes(seed)
                fh.write(json.dumps({"file_name": f"{i}.png", "conditioning_image_file_name": f"conditioning/{i}.png",
                                     "text": f"caption {i}"}) + "\n")
        cfg = TrainConfig(train_data_dir=str(root))
        print(f"check_data_args, {rows} rows: {best_of(lambda: check_data_args(cfg)):.2f} s")
        print(f"load_examples, {rows} rows: {best_of(lambda: load_examples(cfg)):.2f} s")
        examples = load_examples(cfg)
        print(f"fingerprint, {rows} rows: {best_of(examples.fingerprint):.2f} s")

        rng = np.random.default_rng(0)
        photo = Image.fromarray(rng.integers(0, 256, (576, 768, 3), dtype=np.uint8))
        condition = Image.fromarray(rng.integers(0, 256, (576, 768), dtype=np.uint8))
        transform = PairedTransform(512, 3)
        per_sample = best_of(lambda: [transform(photo, condition, flip=i % 2 == 0) for i in range(samples)]) / samples
        print(f"PairedTransform 768x576 -> 512, decoded images: {per_sample * 1000:.1f} ms/sample")

        big = root / "big"
        big.mkdir()
        photo.save(big / "0.jpg", quality=90)
        condition.save(big / "0.png")
        (big / "metadata.jsonl").write_text(json.dumps({"file_name": "0.jpg", "conditioning_image_file_name": "0.png",
                                                        "text": "x"}) + "\n")
        ds = ControlNetDataset(load_examples(TrainConfig(train_data_dir=str(big), resolution=512)),
                               PairedTransform(512, 3), random_flip=True)
        per_item = best_of(lambda: [ds[0] for _ in range(samples)]) / samples
        print(f"ControlNetDataset item (JPEG + PNG decode, 768x576 -> 512): {per_item * 1000:.1f} ms/sample")


if __name__ == "__main__":
    main()
