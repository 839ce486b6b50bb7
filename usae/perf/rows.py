"""A benchmark result row and the table that prints them.

Every entry returns a list of rows ``{"entry", "what", "ours", "reference", "unit", "ratio", "target",
"passed"}``; a ratio is always "ours is this many times better", so each target reads "ratio >= target".
Timed rows also carry ``samples`` (timed samples per side), ``ours_spread``/``reference_spread`` (fastest and
slowest sample) and ``noisy`` (the quiet-machine guard of ``usae.perf.timing.interleaved``): a noisy row's
``passed`` is None, because a timing taken under load is not a result.
"""

from __future__ import annotations

import math

Row = dict[str, object]


def row(entry_name: str, what: str, ours: float, reference: float, unit: str, ratio: float,
        target: float | None, *, ours_spread: tuple[float, float] | None = None,
        reference_spread: tuple[float, float] | None = None, samples: int | None = None,
        noisy: bool | None = None) -> Row:
    """One result row; ``ratio`` is how many times better ours is (higher is better)."""
    judged = target is not None and not noisy and math.isfinite(ratio)
    out: Row = {"entry": entry_name, "what": what, "ours": ours, "reference": reference, "unit": unit,
                "ratio": ratio, "target": target, "passed": bool(ratio >= target) if judged else None}
    if samples is not None:
        out.update({"samples": samples, "ours_spread": list(ours_spread or ()),
                    "reference_spread": list(reference_spread or ())})
    if noisy is not None:
        out["noisy"] = noisy
    return out


def format_table(rows: list[Row]) -> str:
    head = (f"{'entry':<8} {'what':<58} {'ours':>10} {'reference':>10} {'unit':<6} {'ratio':>7} {'target':>7} "
            f"{'n':>3}  ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = "noisy" if r.get("noisy") else {True: "yes", False: "NO", None: "-"}[r["passed"]]
        target = "-" if r["target"] is None else f">={r['target']:.3g}"
        n = r.get("samples", "")
        lines.append(f"{r['entry']:<8} {str(r['what'])[:58]:<58} {r['ours']:>10.4g} {r['reference']:>10.4g} "
                     f"{r['unit']:<6} {r['ratio']:>7.2f} {target:>7} {n:>3}  {ok}")
    if any(r.get("noisy") for r in rows):
        lines.append("noisy: other processes used more than 0.2 cores during the timed samples; not a result")
    return "\n".join(lines)
