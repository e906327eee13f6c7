"""`zeroconv report` (issue 17): the page of tiny training runs, in a real browser and as plain HTML.

The browser tests drive Debian's Chromium (`apt-get install chromium`; `make test` installs it) through Playwright.
They skip where no Chromium is installed, except under ZEROCONV_REQUIRE_BROWSER=1 (.ci/run sets it), where a
missing browser fails them: CI must not pass by skipping. Screenshots go to test-artifacts/ (git-ignored).
"""

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.train.helpers import run_training, tiny_config
from zeroconv.errors import UserError
from zeroconv.report import build_html, name_runs, read_run, refresh_report, write_report

STEPS = [0, 2, 4, 6]  # validation every 2 of 6 steps, step 0 the base alone
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def grid_uri(run: Path, step: int) -> str:
    return "data:image/png;base64," + base64.b64encode((run / "validation" / f"step-{step:06d}.png").read_bytes()
                                                       ).decode()


def slider_max(page_html: str, run: int = 0) -> int | None:
    match = re.search(rf'id="slider-{run}" min="0" max="(\d+)"', page_html)
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """Two tiny canny runs (two learning rates) with `--report`; what the page held at each validation."""
    from zeroconv.testing import make_image_dataset

    root = tmp_path_factory.mktemp("report_runs")
    data = make_image_dataset(root / "data", n=8, size=64, layout="kohya")
    shutil.rmtree(data / "conditioning")  # canny computes the conditions, and the metric re-extracts them
    image = next((data / "images").glob("*.png"))
    folders, seen = [], {}
    for name, lr in (("slow", 1e-4), ("fast", 1e-3)):
        out = root / name

        def look(step, _pipe, out=out, name=name):
            # called inside each validation, before that validation's own refresh: the page shows the previous one
            page = out / "report.html"
            seen.setdefault(name, []).append((step, slider_max(page.read_text()) if page.is_file() else None))
            return {}

        cfg = tiny_config(tiny_base, data, out, max_train_steps=6, condition="canny", validation_steps=2,
                          learning_rate=lr, validation_image=[str(image)], validation_prompt=["a red square"],
                          num_validation_images=2, validation_inference_steps=2, report=True)
        assert run_training(cfg, evaluator=look) == 0
        folders.append(out)
    return folders, seen


def test_train_report_is_refreshed_at_every_validation_and_at_the_end(runs):
    (slow, _), seen = runs
    # before step 0 nothing; at step 2 the page has the step-0 grid (slider index 0), and so on
    assert seen["slow"] == [(0, None), (2, 0), (4, 1), (6, 2)]
    page = (slow / "report.html").read_text()
    assert slider_max(page) == len(STEPS) - 1
    assert "finished at step 6" in page and "still training" not in page


def test_html_of_a_run_in_progress(runs, tmp_path):
    """A resumed run past its old train_summary.json, a half-written metrics line and grid: the page shows what
    exists so far."""
    slow = runs[0][0]
    run = tmp_path / "in-progress"
    shutil.copytree(slow, run, ignore=shutil.ignore_patterns("report.html", "step-000006.png"))
    (run / "train_summary.json").write_text(json.dumps({"global_step": 2, "skipped_samples": 0}))
    rows = (run / "metrics.jsonl").read_text().splitlines()
    keep = [line for line in rows if json.loads(line)["step"] <= 4]
    (run / "metrics.jsonl").write_text("\n".join(keep) + '\n{"step": 5, "train/lo')
    (run / "validation" / "step-000006.png").write_bytes((slow / "validation" / "step-000006.png").read_bytes()[:200])

    page = build_html([read_run(run)])
    assert "still training" in page and "in progress (or stopped) at step 4 of 6" in page
    assert slider_max(page) == 2  # steps 0, 2, 4: the truncated grid of step 6 is left out
    for step in (0, 2, 4):
        assert grid_uri(run, step) in page
    metric_chart = page.split('id="chart-metric-0"')[1].split("</svg>")[0]
    assert re.findall(r'class="pt" data-run="0" data-step="(\d+)"', metric_chart) == ["0", "2", "4"]
    assert 'data-step="0"' in metric_chart and "base alone (step 0)" in metric_chart
    # self-contained: nothing to fetch, neither a script, a style sheet nor an image
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<link rel=\"stylesheet\"" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


def test_html_of_a_demo_folder_in_progress(tmp_path):
    """A demo mid-run: summary.json has the baseline and the validations so far, samples.jsonl the images."""
    from PIL import Image

    demo = tmp_path / "demo"
    (demo / "data").mkdir(parents=True)
    Image.new("RGB", (64, 64), "black").save(demo / "data" / "cond.png")
    rows = []
    for step, model in ((0, "base"), (50, "controlnet-step-000050")):
        (demo / "samples" / model).mkdir(parents=True)
        Image.new("RGB", (64, 64), (step * 4, 0, 0)).save(demo / "samples" / model / "0.png")
        rows.append({"image": f"samples/{model}/0.png", "condition": "data/cond.png", "prompt": "red circle",
                     "model": model, "step": step, "metric": "fill"})
    (demo / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (demo / "summary.json").write_text(json.dumps({
        "baseline": {"fill_iou": 0.4}, "history": [{"model": "controlnet-step-000050", "step": 50, "fill_iou": 0.8}]}))

    run = read_run(demo)
    assert run.kind == "demo" and not run.finished
    assert [step for step, _ in run.grids] == [0, 50]
    assert run.curves == {"fill_iou": {0: 0.4, 50: 0.8}}
    assert run.summaries["fill_iou"]["control_appeared_at"] == 50  # zeroconv.evaluate.curve's rule
    page = build_html([run])
    assert "control @ 50" in page and "base alone (no ControlNet)" in page


def test_bad_run_dir_is_a_user_error_naming_it(tmp_path, capsys):
    from zeroconv.cli import main

    with pytest.raises(UserError, match=r"RUN_DIR .*missing: no such folder"):
        write_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "RUN_DIR" in err and "--output_dir" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert refresh_report(tmp_path / "empty") is None  # the training hook logs, never raises


def test_report_help_explains_every_option():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "zeroconv", "report", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "RUN_DIR" in proc.stdout and "--out" in proc.stdout and "report.html" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# In Chromium
# ---------------------------------------------------------------------------------------------------------------

def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    def unavailable(reason):
        if os.environ.get("ZEROCONV_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (ZEROCONV_REQUIRE_BROWSER=1: CI must run the browser tests)")
        pytest.skip(reason)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install -e '.[test]'")
    executable = chromium_path()
    if executable is None:
        unavailable("no Chromium on PATH: apt-get install -y chromium (make test does)")
    with sync_playwright() as playwright:
        # Debian's build: Playwright's own browser download needs a network these machines lack
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


def open_page(browser, html_file: Path):
    """The page loaded with every request recorded and any non-file one blocked; console errors collected."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://") else route.abort())
    page.goto(html_file.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, requests, errors


def shown_step(page, run: int = 0) -> int:
    return int(page.get_attribute(f"#grid-{run}", "data-step"))


def drag_slider_to(page, run: int, fraction: float) -> None:
    box = page.locator(f"#slider-{run}").bounding_box()
    page.mouse.click(box["x"] + box["width"] * fraction, box["y"] + box["height"] / 2)


def test_page_in_chromium_slider_arrows_points_no_network(runs, browser):
    slow = runs[0][0]
    out = write_report([slow])
    page, requests, errors = open_page(browser, out)
    try:
        assert shown_step(page) == STEPS[-1]  # opens on the latest validation
        drag_slider_to(page, 0, 0.0)
        assert shown_step(page) == 0
        assert page.get_attribute("#grid-0", "src") == grid_uri(slow, 0)
        assert "step 0 (base alone)" in page.inner_text("#steplabel-0")
        page.keyboard.press("ArrowRight")  # the slider has the focus: it steps itself
        assert shown_step(page) == 2 and page.get_attribute("#grid-0", "src") == grid_uri(slow, 2)
        page.click("h1")  # focus off the slider: the page's own arrow handler steps it
        page.keyboard.press("ArrowRight")
        assert shown_step(page) == 4 and page.get_attribute("#grid-0", "src") == grid_uri(slow, 4)
        page.keyboard.press("ArrowLeft")
        assert shown_step(page) == 2
        assert grid_uri(slow, 2) != grid_uri(slow, 4)  # else the src checks above prove nothing

        # one point per validation on every metric chart, at the validation steps
        metric_charts = page.locator("svg.chart[id^='chart-metric-']")
        assert metric_charts.count() == 3  # canny: edge_f1, edge_precision, edge_recall
        for k in range(metric_charts.count()):
            steps = metric_charts.nth(k).locator("circle.pt").evaluate_all("els => els.map(e => +e.dataset.step)")
            assert steps == STEPS
        assert page.locator("#chart-loss polyline.series").count() == 1
        assert "training step" in page.text_content("#chart-loss") and "MSE" in page.text_content("#chart-loss")

        point = page.locator("#chart-metric-0 circle.pt").nth(1)
        point.hover()
        value = float(point.get_attribute("data-value"))
        tip = page.locator("#tip")
        assert tip.is_visible() and "slow: step 2, edge_f1" in tip.inner_text()
        assert abs(float(tip.inner_text().split()[-1]) - value) < 1e-3

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-one-run.png"), full_page=True)
        assert errors == []
        assert requests == [out.resolve().as_uri()], requests  # the page itself; its images are data URIs
    finally:
        page.close()


def test_two_runs_share_one_chart_per_metric_and_have_a_slider_each(runs, browser, tmp_path):
    (slow, fast), _ = runs
    out = write_report([slow, fast], tmp_path / "both.html")
    page, requests, errors = open_page(browser, out)
    try:
        for chart in ("#chart-loss", "#chart-metric-0"):
            assert page.locator(f"{chart} polyline.series").evaluate_all(
                "els => els.map(e => e.dataset.run)") == ["0", "1"]
        for run in (0, 1):
            assert page.locator(f"#chart-metric-0 circle.pt[data-run='{run}']").count() == len(STEPS)
        legend = page.text_content("#chart-metric-0")
        assert "slow" in legend and "fast" in legend
        drag_slider_to(page, 1, 0.0)
        assert shown_step(page, 1) == 0 and shown_step(page, 0) == STEPS[-1]
        assert page.get_attribute("#grid-1", "src") == grid_uri(fast, 0)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-two-runs.png"), full_page=True)
        assert errors == [] and requests == [out.resolve().as_uri()]
    finally:
        page.close()


def test_runs_with_the_same_folder_name_get_distinct_labels(tmp_path):
    from zeroconv.report import Run

    runs = [Run(tmp_path / "a" / "controlnet", "train"), Run(tmp_path / "b" / "controlnet", "train")]
    name_runs(runs)
    assert [r.name for r in runs] == ["a/controlnet", "b/controlnet"]
