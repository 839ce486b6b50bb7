"""Build the research book: vendor plotly.js, execute every chapter, render HTML with Jupyter Book 1.x.

``python -m usae.book build [--output DIR] [--preset smoke|book|paper]`` (``make book`` calls it). Every
chapter is executed afresh (``execute_notebooks: force``); a failing cell or any Sphinx warning fails the
build. The chapters read the preset from ``USAE_PRESET`` and the artifact cache from ``USAE_RUNS``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from usae.config import PRESETS
from usae.paths import repo_root


def vendor_plotly(root: Path) -> Path:
    """Copy the plotly.js bundle shipped inside the plotly package to ``book/_vendor/`` (no CDN, works offline)."""
    import plotly

    src = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not src.exists():
        raise FileNotFoundError(f"plotly.min.js not found at {src}; reinstall plotly")
    dst_dir = root / "book" / "_vendor"
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "plotly.min.js"
    if not dst.exists() or dst.stat().st_size != src.stat().st_size:
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return dst


def build(output: Path | None = None, preset: str | None = None, root: Path | None = None) -> Path:
    """Execute and render the book; returns the path of ``index.html``. Raises ``RuntimeError`` on failure."""
    root = root or repo_root()
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset = {preset!r} is not valid; expected one of {list(PRESETS)}")
    vendor_plotly(root)
    env = dict(os.environ)
    if preset is not None:
        env["USAE_PRESET"] = preset
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(root), "-W", "--keep-going", "--all"]
    if output is not None:
        cmd += ["--path-output", str(output)]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=root, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit code {result.returncode}); see the log above")
    index = (output or root) / "_build" / "html" / "index.html"
    if not index.exists():
        raise RuntimeError(f"the build finished but {index} is missing")
    print(f"built in {time.perf_counter() - started:.0f} s; open {index}")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usae.book", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="execute every chapter and render the HTML book")
    b.add_argument("--output", type=Path, default=None, help="folder to hold _build/ (default: the repo root)")
    b.add_argument("--preset", choices=PRESETS, default=None, help="override USAE_PRESET for every chapter")
    args = parser.parse_args(argv)
    try:
        build(args.output, args.preset)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
