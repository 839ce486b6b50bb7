"""``make bench``: speed targets measured as ratios against a reference timed in the same run.

``python -m usae.bench [--quick] [ENTRY ...]`` runs the named entries (default: all), prints a table and
writes ``<runs>/bench/<UTC time>.json`` plus ``latest.json``. Every entry returns a list of rows
``{"entry", "what", "ours", "reference", "unit", "ratio", "target", "passed"}``; a ratio is always "ours is
this many times better", so each target reads "ratio >= target".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Callable

import torch

from usae.paths import runs_dir

Row = dict[str, object]
ENTRIES: dict[str, Callable[[bool], list[Row]]] = {}


def entry(name: str) -> Callable[[Callable[[bool], list[Row]]], Callable[[bool], list[Row]]]:
    """Register ``fn(quick: bool) -> rows`` as a benchmark entry."""

    def register(fn: Callable[[bool], list[Row]]) -> Callable[[bool], list[Row]]:
        ENTRIES[name] = fn
        return fn

    return register


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(entry_name: str, what: str, ours: float, reference: float, unit: str, ratio: float,
        target: float | None) -> Row:
    """One result row; ``ratio`` is how many times better ours is (higher is better)."""
    return {"entry": entry_name, "what": what, "ours": ours, "reference": reference, "unit": unit,
            "ratio": ratio, "target": target, "passed": None if target is None else bool(ratio >= target)}


def _load_entries() -> None:
    # entry modules register themselves on import; a module that is not there yet is simply absent
    import importlib

    for module in ("usae.bench_data", "usae.bench_train", "usae.bench_step", "usae.bench_stats", "usae.bench_cam"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def format_table(rows: list[Row]) -> str:
    head = f"{'entry':<18} {'what':<46} {'ours':>11} {'reference':>11} {'unit':<9} {'ratio':>7} {'target':>7}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = {True: "yes", False: "NO", None: "-"}[r["passed"]]
        target = "-" if r["target"] is None else f">={r['target']:.3g}"
        lines.append(f"{r['entry']:<18} {str(r['what'])[:46]:<46} {r['ours']:>11.4g} {r['reference']:>11.4g} "
                     f"{r['unit']:<9} {r['ratio']:>7.2f} {target:>7}  {ok}")
    return "\n".join(lines)


def run(names: list[str] | None = None, quick: bool = False) -> list[Row]:
    """Run the entries (all when ``names`` is empty), save JSON, return the rows."""
    _load_entries()
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
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": quick,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "rows": rows}
    stamp = record["time"].replace(":", "").replace("-", "")
    for path in (out / f"{stamp}.json", out / "latest.json"):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usae.bench", description="usae speed benchmarks")
    parser.add_argument("entries", nargs="*", help="entries to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a fast check")
    args = parser.parse_args(argv)
    rows = run(args.entries, quick=args.quick)
    print(format_table(rows))
    failed = [r for r in rows if r["passed"] is False]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows meet their target" if rows else "no rows")
    return 1 if failed else 0


if __name__ == "__main__":
    # entry modules register into ``usae.bench`` (not this ``__main__`` copy): run that module's main
    from usae.bench import main as _main

    raise SystemExit(_main())
