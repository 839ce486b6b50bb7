"""End to end: build the whole book at the smoke preset, then look at it in headless Chromium.

The build asks chapter 2 for one deliberately failing claim (``USAE_CLAIMS=fail:02_extraction``): the book
must still render every page, show the failure on chapter 2's page, and end with an error naming it and
nothing else. The screenshot check counts pixels of a plotly trace colour; the same page with plotly.js
removed must show none, so the check proves the figure is drawn by the vendored script (not merely present as
JSON). The maths check loads a page with the network refused and counts typeset formulas.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usae.book import build, page_problems
from usae.claims import CLAIMS_MODE_ENV, DELIBERATE
from usae.config import repo_root
from usae.viz.core import PALETTE

# every network request refused: the page must draw from the files of the built book alone
OFFLINE = ("--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


FAILING = "02_extraction"


@pytest.fixture(scope="session")
def build_error(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("book")
    before = os.environ.get(CLAIMS_MODE_ENV)
    os.environ[CLAIMS_MODE_ENV] = f"fail:{FAILING}"
    try:
        with pytest.raises(RuntimeError) as error:
            build(output=out, preset="smoke")
    finally:
        if before is None:
            os.environ.pop(CLAIMS_MODE_ENV)
        else:
            os.environ[CLAIMS_MODE_ENV] = before
    return out / "_build" / "html", str(error.value)


@pytest.fixture(scope="session")
def built_book(build_error) -> Path:
    return build_error[0]


def test_a_failed_claim_still_renders_the_book_and_fails_the_build_naming_it(build_error):
    html_root, message = build_error
    problems = page_problems(html_root)
    assert [(p.page, p.message.split(":")[0]) for p in problems] == [(f"book/{FAILING}.html", "AssertionError")]
    assert problems[0].cell is not None and DELIBERATE in problems[0].message
    assert f"book/{FAILING}.html, cell {problems[0].cell}" in message and DELIBERATE in message
    page = (html_root / "book" / f"{FAILING}.html").read_text()
    assert f"claim(s) of {FAILING} failed" in page and 'class="admonition error"' in page


def screenshot(page: Path, png: Path, profile: Path) -> np.ndarray:
    """A screenshot of the page in headless Chromium, offline."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--window-size=1400,9000", "--virtual-time-budget=15000",
           *OFFLINE, f"--screenshot={png}", page.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def count_colour(pixels: np.ndarray, hex_colour: str, tol: int = 12) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).max(axis=-1) <= tol).sum())


def test_every_chapter_is_rendered_with_figures(built_book):
    toc = (repo_root() / "_toc.yml").read_text()
    pages = [line.split("file:")[1].strip() for line in toc.splitlines() if "file:" in line]
    assert len(pages) >= 12
    for name in pages:
        html = (built_book / f"{name}.html").read_text()
        if FAILING not in name:
            assert "Traceback" not in html, name
        if name.split("/")[-1][:2].isdigit():
            assert "Plotly.newPlot" in html, f"{name}: no plotly figure in the HTML"
    assert (built_book / "_static" / "plotly.min.js").exists()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed")
def test_figures_are_visible_in_a_browser(built_book, tmp_path):
    assert CHROMIUM, "CI must have chromium (.ci/run installs it)"
    page = built_book / "book" / "01_toy_world.html"
    shown = count_colour(screenshot(page, tmp_path / "with.png", tmp_path / "p1"), PALETTE[0])
    # negative control: the same page without plotly.js draws no trace
    stripped = page.with_name("no_plotly.html")
    stripped.write_text(page.read_text().replace("plotly.min.js", "missing.js"))
    hidden = count_colour(screenshot(stripped, tmp_path / "without.png", tmp_path / "p2"), PALETTE[0])
    assert shown > 2000, f"only {shown} pixels of the bar colour are visible"
    assert hidden < shown / 20, (hidden, shown)


def dump_dom_offline(page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium, offline."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           *OFFLINE, "--virtual-time-budget=15000",
           "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed")
def test_maths_is_typeset_offline(built_book, tmp_path):
    assert CHROMIUM, "CI must have chromium (.ci/run installs it)"
    page = built_book / "book" / "appendix_discrepancies.html"
    html = page.read_text()
    assert "_static/mathjax/tex-chtml.js" in html and "cdn.jsdelivr" not in html
    assert (built_book / "_static" / "mathjax" / "tex-chtml.js").exists()
    typeset = dump_dom_offline(page, tmp_path / "p1").count("<mjx-container")
    # negative control: without the vendored script the same page typesets nothing
    stripped = page.with_name("no_mathjax.html")
    stripped.write_text(html.replace("_static/mathjax/tex-chtml.js", "_static/mathjax/missing.js"))
    assert dump_dom_offline(stripped, tmp_path / "p2").count("<mjx-container") == 0
    assert typeset >= 3, f"only {typeset} formulas typeset on {page.name}"


def test_papermill_runs_a_chapter_with_injected_parameters(tmp_path):
    import papermill as pm

    root = repo_root()
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(root / "book" / "01_toy_world.ipynb"), str(out), cwd=str(root / "book"),
                        parameters={"preset": "smoke", "n_examples": 5}, progress_bar=False,
                        kernel_name="python3")
    nb = json.loads(out.read_text())
    tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
    assert any("injected-parameters" in t for t in tags)
    assert not any(o.get("output_type") == "error" for c in nb["cells"] for o in c.get("outputs", []))
    source = "".join("".join(c["source"]) for c in nb["cells"])
    assert "n_examples = 5" in source


def test_execution_phases_put_the_builders_first_and_the_timing_chapter_alone_last():
    from usae.book import EXECUTE_FIRST, EXECUTE_LAST, execution_phases

    phases = [[p.stem for p in phase] for phase in execution_phases(repo_root())]
    assert phases[:3] == [[n] for n in EXECUTE_FIRST] and phases[-1:] == [[n] for n in EXECUTE_LAST]
    middle = phases[3]
    assert len(phases) == 5 and "04_cross_reconstruction" in middle and "09_cam" in middle
    every = sorted(p.stem for p in (repo_root() / "book").glob("*.ipynb"))
    assert sorted(n for phase in phases for n in phase) == every
