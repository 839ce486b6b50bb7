"""A benchmark result row and the table that prints them.

Every entry returns a list of rows ``{"entry", "what", "ours", "reference", "unit", "ratio", "target",
"passed"}``; a ratio is always "ours is this many times better", so each target reads "ratio >= target".
"""

from __future__ import annotations

Row = dict[str, object]


def row(entry_name: str, what: str, ours: float, reference: float, unit: str, ratio: float,
        target: float | None) -> Row:
    """One result row; ``ratio`` is how many times better ours is (higher is better)."""
    return {"entry": entry_name, "what": what, "ours": ours, "reference": reference, "unit": unit,
            "ratio": ratio, "target": target, "passed": None if target is None else bool(ratio >= target)}


def format_table(rows: list[Row]) -> str:
    head = f"{'entry':<18} {'what':<46} {'ours':>11} {'reference':>11} {'unit':<9} {'ratio':>7} {'target':>7}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = {True: "yes", False: "NO", None: "-"}[r["passed"]]
        target = "-" if r["target"] is None else f">={r['target']:.3g}"
        lines.append(f"{r['entry']:<18} {str(r['what'])[:46]:<46} {r['ours']:>11.4g} {r['reference']:>11.4g} "
                     f"{r['unit']:<9} {r['ratio']:>7.2f} {target:>7}  {ok}")
    return "\n".join(lines)
