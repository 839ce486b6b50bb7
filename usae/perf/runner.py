"""``usae bench`` (``make bench``): speed targets measured as ratios against a reference timed in the same run.

``usae bench [--quick] [ENTRY ...]`` runs the named entries of ``ENTRIES`` (default: all), prints a table of
rows (``usae.perf.rows``) and writes ``<runs>/bench/<UTC time>.json`` plus ``latest.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime

from usae.config import runs_dir
from usae.perf import cam, data, peers, stats, step
from usae.perf.rows import Row

# the entries, in the order ``usae bench`` runs them: name -> fn(quick) -> rows
ENTRIES: dict[str, Callable[[bool], list[Row]]] = {
    "extract": data.extract_entry,
    "store": data.store_entry,
    "step": step.step_entry,
    "peers": peers.peers_entry,
    "stats": stats.stats_entry,
    "cam": cam.bench_cam,
}


def run(names: list[str] | None = None, quick: bool = False) -> list[Row]:
    """Run the entries (all when ``names`` is empty), save JSON, return the rows."""
    names = names or list(ENTRIES)
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        raise ValueError(f"unknown benchmark entries {unknown}; available: {list(ENTRIES)}")
    rows: list[Row] = []
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        rows.extend(ENTRIES[name](quick))
    out = runs_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "quick": quick,
              "machine": step.device_info(),
              "rows": rows}
    stamp = record["time"].replace(":", "").replace("-", "")
    for path in (out / f"{stamp}.json", out / "latest.json"):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    return rows
