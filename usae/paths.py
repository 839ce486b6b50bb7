"""Where things live: the repository root and the artifact cache (``data/runs``, or ``$USAE_RUNS``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def repo_root(start: Path | None = None) -> Path:
    """The folder holding ``_config.yml`` and ``usae/``, found by walking up from ``start`` (default: cwd).

    Jupyter Book and nbval run a chapter's kernel in ``book/``, papermill in the invocation folder; both
    find the same root. Falls back to the folder this package was imported from.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_config.yml").is_file() and (folder / "usae").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


def runs_dir() -> Path:
    """The artifact cache: ``$USAE_RUNS`` when set, else ``<repo>/data/runs``."""
    override = os.environ.get("USAE_RUNS")
    path = Path(override).expanduser() if override else repo_root() / "data" / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place, so a reader never
    sees a half-written file; the temporary file is removed if ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
