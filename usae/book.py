"""Build the research book, and run its claims across seeds.

``usae book [--output DIR] [--preset smoke|book|paper]`` (``make book`` calls it) vendors
plotly.js, executes every chapter afresh (the first three in turn, the chapters that only read their
artifacts side by side, the timing chapter alone) and renders HTML with Jupyter Book 1.x from a staged copy of
the sources holding the executed notebooks; a failing cell or any Sphinx warning fails the build. The chapters
read the preset from ``USAE_PRESET``, the pipeline seed from ``USAE_SEED`` and the artifact cache from
``USAE_RUNS``.

``usae seeds --preset book --seeds 0-4 [--jobs 2]`` (``make seeds``) executes the chapters with
papermill for every seed (no rendering; chapter 10, which only times kernels, is left out unless named), with
claims recorded rather than enforced, and writes the seeds table (``data/seeds/<preset>.json``): every claim's
value per seed, its bound, min, max and margin, and the CPU model. ``--jobs 2`` runs two seeds at a time with
one thread each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from html import unescape
from pathlib import Path

from usae._checks import positive_int
from usae._workers import Call, Done, run_calls
from usae.config import PRESETS, repo_root


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


MAX_PAGE_BYTES = 2 << 20  # a page heavier than 2 MiB is a page that embeds raw data it should have reduced


@dataclass(frozen=True)
class PageProblem:
    """What went wrong on one built page: a cell that raised (``cell``: its 1-based number among the page's
    code cells), or a page too heavy (``cell`` None)."""

    page: str
    cell: int | None
    message: str

    def describe(self) -> str:
        return f"{self.page}, cell {self.cell}: {self.message}" if self.cell else f"{self.page}: {self.message}"


def page_problems(html_root: Path) -> list[PageProblem]:
    """Every failed cell (its error's last line) and every page over ``MAX_PAGE_BYTES`` under ``html_root``."""
    problems = []
    for page in sorted(html_root.rglob("*.html")):
        if "_static" in page.parts or "_sources" in page.parts or page.name in ("search.html", "genindex.html"):
            continue
        text = page.read_text(errors="replace")
        name = str(page.relative_to(html_root))
        cells = text.split('<div class="cell docutils container')[1:]
        for number, cell in enumerate(cells, start=1):
            start = cell.find('class="output traceback')
            if start < 0:
                continue
            block = cell[start:cell.find("</pre>", start)]
            lines = [line.strip() for line in unescape(re.sub(r"<[^>]+>", "", block)).splitlines() if line.strip()]
            errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)]
            problems.append(PageProblem(name, number, (errors or lines or ["(no message)"])[-1][:500]))
        size = page.stat().st_size
        if size > MAX_PAGE_BYTES:
            problems.append(PageProblem(name, None, f"{size / (1 << 20):.1f} MiB, over the "
                                                    f"{MAX_PAGE_BYTES >> 20} MiB limit for one page"))
    return problems


# the order in which `usae book` executes the notebooks of book/: these first, one at a time (each builds what
# the next needs: the zoo, the store, the USAE), then every other notebook side by side (one thread each; they
# read what is cached), then these last, alone (chapter 10 times kernels on a quiet machine)
EXECUTE_FIRST = ("01_toy_world", "02_extraction", "03_training")
EXECUTE_LAST = ("10_performance",)


def execution_phases(root: Path) -> list[list[Path]]:
    """The notebooks of ``root/book`` in :data:`EXECUTE_FIRST` order (one phase each), then the others (one
    phase, run side by side), then :data:`EXECUTE_LAST` (one phase each)."""
    found = {p.stem: p for p in sorted((root / "book").glob("*.ipynb"))}
    first = [[found[n]] for n in EXECUTE_FIRST if n in found]
    last = [[found[n]] for n in EXECUTE_LAST if n in found]
    middle = [p for n, p in found.items() if n not in EXECUTE_FIRST + EXECUTE_LAST]
    return first + ([middle] if middle else []) + last


def _execute_notebook(src: str, dst: str, cwd: str) -> None:
    """Execute one notebook (in a worker process) with its cells' errors kept as outputs; write it to ``dst``."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(src, as_version=4)
    NotebookClient(nb, timeout=None, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": cwd}}).execute()
    nbformat.write(nb, dst)


def _failed_notebook(src: Path, dst: Path, message: str) -> None:
    """``src`` with one error output in front, so that its page shows (and :func:`page_problems` finds) a
    notebook whose kernel could not finish."""
    import nbformat

    nb = nbformat.read(str(src), as_version=4)
    cell = nbformat.v4.new_code_cell("# the notebook could not be executed")
    cell.outputs = [nbformat.v4.new_output("error", ename="ExecutionError", evalue=message,
                                           traceback=[f"ExecutionError: {message}"])]
    nb.cells.insert(0, cell)
    nbformat.write(nb, str(dst))


def execute_book(root: Path, out: Path, env: dict[str, str]) -> dict[str, float]:
    """Execute every notebook of ``root/book`` into ``out`` (same names) in :func:`execution_phases` order,
    up to one notebook per core at a time in the side-by-side phase; returns seconds per notebook.

    Each notebook runs in its own process and kernel, in ``root/book``. A kernel that dies leaves its page
    with an error output instead of failing the build there (the build then reports it)."""
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def on_done(done: Done) -> None:
        nb = Path(str(done.key))
        seconds[nb.stem] = done.seconds
        if not done.ok or not (out / nb.name).exists():
            _failed_notebook(nb, out / nb.name, done.reason())
            print(f"{nb.stem}: could not be executed ({done.reason()})", flush=True)
        else:
            print(f"executed {nb.stem} in {done.seconds:.0f} s", flush=True)

    for phase in execution_phases(root):
        side_by_side = len(phase) > 1
        ordered = sorted(phase, key=lambda p: -_EXPECTED_SECONDS.get(p.stem, 0))   # longest first
        calls = [Call(str(nb), "usae.book", "_execute_notebook", (str(nb), str(out / nb.name), str(root / "book")))
                 for nb in ordered]
        run_calls(calls, max(1, os.cpu_count() or 1) if side_by_side else 1,
                  {**env, "OMP_NUM_THREADS": "1"} if side_by_side else env, on_done, cwd=root / "book")
    return seconds


# measured seconds of the side-by-side notebooks at the book preset (an order for the scheduler, not a claim)
_EXPECTED_SECONDS = {"09_cam": 70, "04_cross_reconstruction": 60, "06_concepts": 20, "07_consistency": 15,
                     "08_ground_truth": 15, "05_universality": 5}


def _stage(root: Path, executed: Path, stage: Path) -> None:
    """A copy of the book's sources in ``stage`` with the executed notebooks, rendered without executing."""
    import yaml

    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(root / "book", stage / "book", ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
    for nb in executed.glob("*.ipynb"):
        shutil.copyfile(nb, stage / "book" / nb.name)
    shutil.copyfile(root / "_toc.yml", stage / "_toc.yml")
    config = yaml.safe_load((root / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    (stage / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def build(output: Path | None = None, preset: str | None = None, root: Path | None = None) -> Path:
    """Execute and render the book; returns the path of ``index.html``.

    The notebooks are executed first (:func:`execute_book`: the first chapters in turn, the rest side by side,
    the timing chapter alone), then Jupyter Book renders a staged copy of the sources holding them, without
    executing again (``jupyter-book build .`` alone still executes every chapter in turn). Every chapter
    renders even when a cell fails (a failed claim shows on its page as a marked box and its traceback); the
    build then raises ``RuntimeError`` listing each failure (page, cell, message) and each page over 2 MiB,
    after printing where the rendered book is. A Sphinx warning or a missing page also raises."""
    root = root or repo_root()
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset = {preset!r} is not valid; expected one of {list(PRESETS)}")
    vendor_plotly(root)
    env = dict(os.environ)
    if preset is not None:
        env["USAE_PRESET"] = preset
    started = time.perf_counter()
    work = (output or root) / "_build" / ".usae-book"
    shutil.rmtree(work, ignore_errors=True)
    execute_book(root, work / "executed", env)
    _stage(root, work / "executed", work / "source")
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(work / "source"), "-W", "--keep-going", "--all", "--path-output", str(output or root)]
    result = subprocess.run(cmd, cwd=root, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit code {result.returncode}); see the log above")
    index = (output or root) / "_build" / "html" / "index.html"
    if not index.exists():
        raise RuntimeError(f"the build finished but {index} is missing")
    print(f"built in {time.perf_counter() - started:.0f} s; open {index}")
    problems = page_problems(index.parent)
    if problems:
        raise RuntimeError(f"the book was rendered ({index}), but {len(problems)} problem(s) were found:\n  "
                           + "\n  ".join(p.describe() for p in problems))
    return index


SEED_CHAPTERS_SKIPPED = ("10_performance",)  # timing only: no seed-dependent claim


def chapters(root: Path, names: list[str] | None = None) -> list[Path]:
    """The numbered chapter notebooks (``book/NN_*.ipynb``), or those named (file stem, e.g. ``05_universality``)."""
    found = sorted((root / "book").glob("[0-9][0-9]_*.ipynb"))
    if names is None:
        return [p for p in found if p.stem not in SEED_CHAPTERS_SKIPPED]
    by_stem = {p.stem: p for p in found}
    unknown = [n for n in names if n not in by_stem]
    if unknown:
        raise ValueError(f"chapters {unknown} are not valid; expected names from {sorted(by_stem)}")
    return [by_stem[n] for n in names]


def run_seed(seed: int, preset: str, notebooks: list[Path], claims_dir: Path, executed_dir: Path,
             root: Path) -> dict[str, float]:
    """Execute ``notebooks`` in order for one seed (claims recorded under ``claims_dir``); returns seconds per
    chapter. A chapter that raises is reported and the next one still runs (each computes what it needs)."""
    import papermill as pm

    # the kernels papermill starts inherit this environment; restored afterwards
    saved = {k: os.environ.get(k) for k in ("USAE_SEED", "USAE_PRESET", "USAE_CLAIMS_DIR", "USAE_CLAIMS")}
    os.environ.update({"USAE_SEED": str(seed), "USAE_PRESET": preset, "USAE_CLAIMS_DIR": str(claims_dir),
                       "USAE_CLAIMS": "record"})
    try:
        return _run_chapters(seed, preset, notebooks, claims_dir, executed_dir, root, pm)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_chapters(seed: int, preset: str, notebooks: list[Path], claims_dir: Path, executed_dir: Path, root: Path,
                  pm) -> dict[str, float]:
    seconds: dict[str, float] = {}
    errors: dict[str, str] = {}
    executed_dir.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        started = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(executed_dir / f"{nb.stem}-seed{seed}.ipynb"), cwd=str(root / "book"),
                                parameters={"preset": preset, "seed": seed}, progress_bar=False,
                                kernel_name="python3")
            status = "ok"
        except Exception as err:  # noqa: BLE001 - report, then run the next chapter
            status = f"FAILED: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            errors[nb.stem] = status
        seconds[nb.stem] = time.perf_counter() - started
        print(f"seed {seed} {nb.stem}: {seconds[nb.stem]:.0f} s {status}", flush=True)
    timing = claims_dir / str(seed) / "seconds.json"
    timing.parent.mkdir(parents=True, exist_ok=True)
    timing.write_text(json.dumps(seconds, indent=1))
    (claims_dir / str(seed) / "errors.json").write_text(json.dumps(errors, indent=1))
    return seconds


def seeds(seed_list: list[int], preset: str = "book", jobs: int = 1, names: list[str] | None = None,
          table: Path | None = None, work: Path | None = None, root: Path | None = None, check: bool = False,
          run: bool = True, threads: int | None = None) -> Path:
    """Run the chapters for every seed (``jobs`` seeds at a time) and write the seeds table; returns its path.
    ``check``: RuntimeError when a claim fails for some seed (or a chapter raised). ``run=False`` only gathers
    the records already under ``work`` (e.g. seeds run in separate invocations; ``threads`` as they ran)."""
    from usae.claims import SeedsTable

    root = root or repo_root()
    if preset not in PRESETS:
        raise ValueError(f"preset = {preset!r} is not valid; expected one of {list(PRESETS)}")
    positive_int("jobs", jobs)
    notebooks = chapters(root, names)
    work = work or root / "data" / "runs" / f"seeds-{preset}"
    claims_dir, executed = work / "claims", work / "executed"
    table = table or root / "data" / "seeds" / f"{preset}.json"
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1)
    if not run:
        pass
    elif jobs == 1:
        for s in seed_list:
            run_seed(s, preset, notebooks, claims_dir, executed, root)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        groups = [seed_list[i::jobs] for i in range(jobs)]
        procs = []
        for group in groups:
            if not group:
                continue
            cmd = [sys.executable, "-m", "usae.cli", "seeds", "--preset", preset, "--jobs", "1", "--no-table",
                   "--seeds", ",".join(map(str, group)), "--work", str(work)]
            if names is not None:
                cmd += ["--chapters", ",".join(names)]
            procs.append(subprocess.Popen(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": str(threads)}))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"a seeds worker failed (exit codes {codes}); see the log above")
    result = SeedsTable.collect(claims_dir, preset, seed_list, threads)
    result.save(table)
    failed = result.failed()
    print(f"seeds table: {table} ({len(result.rows)} claims, {len(failed)} failing for some seed)")
    for r in failed:
        print(f"  fails: {r.chapter} / {r.name}: {r.op} {r.bound} vs {r.values}")
    errors = {}
    for sd in seed_list:
        path = claims_dir / str(sd) / "errors.json"
        if path.exists():
            errors.update({f"seed {sd}: {ch}": msg for ch, msg in json.loads(path.read_text()).items()})
    for where, msg in errors.items():
        print(f"  chapter error: {where}: {msg} (executed notebook under {executed})")
    if check and errors:
        raise RuntimeError(f"{len(errors)} chapter run(s) raised: {sorted(errors)}")
    if check and failed:
        raise RuntimeError(f"{len(failed)} claim(s) failed for some seed of {seed_list}: "
                           + "; ".join(f"{r.chapter} / {r.name}" for r in failed))
    return table
