"""docs/report.png: the report page of a demo run in headless Chromium, as the README shows it.

    python docs/screenshot.py demo-out/report.html docs/report.png [--step 100]

The page at 1180 px wide, the slider moved to --step and the pointer on the fill IoU point of that step (its
tooltip shown). Needs Playwright and a Chromium on PATH (`make chromium`); nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", help="a report.html (zeroconv demo writes OUT/report.html)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--step", type=int, default=100, help="validation step shown (default: 100)")
    args = parser.parse_args()
    page_file = Path(args.page)
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise SystemExit("no Chromium on PATH: `make chromium` installs Debian's")
    steps = [int(s) for s in re.findall(r'<circle class="pt"[^>]*data-step="(\d+)"', page_file.read_text())]
    if args.step not in steps:
        raise SystemExit(f"--step {args.step}: {page_file} has no validation at that step (it has {sorted(set(steps))})")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_page(viewport={"width": 1180, "height": 1000})
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
                   else route.abort())
        page.goto(page_file.resolve().as_uri())
        page.wait_for_load_state("load")
        page.focus("#slider-0")
        page.keyboard.press("Home")
        while int(page.get_attribute("#grid-0", "data-step")) < args.step:
            page.keyboard.press("ArrowRight")
        page.locator(f'#chart-metric-0 circle.pt[data-step="{args.step}"]').first.hover()
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}: {page_file}, step {args.step}")


if __name__ == "__main__":
    main()
