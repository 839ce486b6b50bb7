"""The book's claims: each chapter's checked sentences, recorded per seed and gathered into the seeds table.

A chapter's Checks cell asserts two kinds of things. **Invariants** (shapes, sortedness, API contracts) are
plain ``assert`` statements and hold at every preset. **Claims** are numbers compared with a bound that was
chosen from the seeds table (``data/seeds/book.json``: every claim at the ``book`` preset for seeds 0-4):

>>> claims = Claims("05_universality", preset, seed)
>>> claims.at_least("universal concepts (FE > 0.9, CFP > 0.3 in all)", len(relaxed), 10)
>>> claims.value("concepts in the top FE bin", int(counts[-1]))      # a headline number, no bound
>>> claims.verify()        # raises AssertionError listing every failed claim (book preset only)

Bounds are calibrated for the ``book`` preset on the toy world, so claims are enforced only there; at the
other presets they are recorded and printed, never asserted. With ``$USAE_CLAIMS_DIR`` set, ``verify`` also
writes ``<dir>/<seed>/<chapter>.json`` (how ``usae seeds`` collects them); with
``$USAE_CLAIMS=record`` it records without raising, so one failed claim does not hide the others' values.
With ``$USAE_CLAIMS=fail:<chapter>`` that chapter gets one deliberately failing claim, enforced at any preset
(how the tests check that a failed claim shows on its page and fails ``usae book``).

A failed, enforced claim shows in the chapter's page as a marked box listing the failures, then raises.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Claim", "Claims", "ENFORCED_PRESET", "MARGIN_FRACTION", "SeedsRow", "SeedsTable", "cpu_model",
           "parse_seeds"]

ENFORCED_PRESET = "book"
# a bound must leave the worst seed at least this share of its own value, and half the seeds' spread, as margin
MARGIN_FRACTION = 0.1
CLAIMS_DIR_ENV = "USAE_CLAIMS_DIR"
CLAIMS_MODE_ENV = "USAE_CLAIMS"
_OPS = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}


@dataclass(frozen=True)
class Claim:
    """One checked number: ``value op bound`` (``op`` None for a headline number without a bound)."""

    chapter: str
    name: str
    value: float
    op: str | None = None
    bound: float | None = None

    @property
    def holds(self) -> bool:
        return self.op is None or (math.isfinite(self.value) and _OPS[self.op](self.value, self.bound))

    def describe(self) -> str:
        if self.op is None:
            return f"{self.name} = {self.value:.4g}"
        return f"{self.name}: {self.value:.4g} {self.op} {self.bound:.4g} {'holds' if self.holds else 'FAILS'}"


def _number(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"claim {name!r}: value {value!r} is not a number") from None
    return out


class Claims:
    """The claims of one chapter run (``chapter`` name, ``preset``, pipeline ``seed``)."""

    def __init__(self, chapter: str, preset: str, seed: int) -> None:
        if not isinstance(chapter, str) or not chapter:
            raise ValueError(f"chapter = {chapter!r} is not valid; expected the chapter's file name")
        self.chapter, self.preset, self.seed = chapter, preset, int(seed)
        self.items: list[Claim] = []

    def _add(self, name: str, value: Any, op: str | None, bound: Any) -> Claim:
        if any(c.name == name for c in self.items):
            raise ValueError(f"claim {name!r} is recorded twice in {self.chapter}")
        claim = Claim(self.chapter, name, _number(name, value), op, None if bound is None else _number(name, bound))
        self.items.append(claim)
        return claim

    def at_least(self, name: str, value: Any, bound: Any, *, strict: bool = False) -> Claim:
        """Claim ``value >= bound`` (``>`` with ``strict``)."""
        return self._add(name, value, ">" if strict else ">=", bound)

    def at_most(self, name: str, value: Any, bound: Any, *, strict: bool = False) -> Claim:
        """Claim ``value <= bound`` (``<`` with ``strict``)."""
        return self._add(name, value, "<" if strict else "<=", bound)

    def value(self, name: str, value: Any) -> Claim:
        """A headline number (no bound), reported per seed in the seeds table."""
        return self._add(name, value, None, None)

    @property
    def deliberate_failure(self) -> bool:
        """Whether ``$USAE_CLAIMS=fail:<this chapter>`` asks for one failing claim (tests of the book build)."""
        return os.environ.get(CLAIMS_MODE_ENV, "") == f"fail:{self.chapter}"

    @property
    def enforced(self) -> bool:
        mode = os.environ.get(CLAIMS_MODE_ENV, "")
        return self.deliberate_failure or (self.preset == ENFORCED_PRESET and mode != "record")

    def failures(self) -> list[Claim]:
        return [c for c in self.items if not c.holds]

    def verify(self) -> None:
        """Print every claim, write the record (``$USAE_CLAIMS_DIR``), and raise AssertionError listing the failed
        ones when enforced (book preset, not ``$USAE_CLAIMS=record``)."""
        if self.deliberate_failure and not any(c.name == DELIBERATE for c in self.items):
            self.at_least(DELIBERATE, 0, 1)
        for c in self.items:
            print(("  " if c.holds else "✗ ") + c.describe())
        folder = os.environ.get(CLAIMS_DIR_ENV)
        if folder:
            out = Path(folder) / str(self.seed)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".{self.chapter}.json.tmp"
            tmp.write_text(json.dumps({"chapter": self.chapter, "preset": self.preset, "seed": self.seed,
                                       "claims": [asdict(c) for c in self.items]}, indent=1))
            os.replace(tmp, out / f"{self.chapter}.json")
        failed = self.failures()
        if self.deliberate_failure and self.preset != ENFORCED_PRESET:  # only the deliberate one is enforced
            failed = [c for c in failed if c.name == DELIBERATE]
        if failed and self.enforced:
            _show_failures(self.chapter, self.seed, failed)
            raise AssertionError(f"{len(failed)} claim(s) of {self.chapter} failed at seed {self.seed}: "
                                 + "; ".join(c.describe() for c in failed))
        if failed:
            print(f"({len(failed)} claim(s) outside their book-preset bounds; bounds are enforced only at the "
                  f"{ENFORCED_PRESET!r} preset)")


DELIBERATE = "deliberate failure ($USAE_CLAIMS=fail:<chapter>)"


def _show_failures(chapter: str, seed: int, failed: Sequence[Claim]) -> None:
    """A marked box in the notebook's output (the rendered page) listing the failed claims; nothing outside
    IPython."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        return
    if get_ipython() is None:
        return
    from html import escape

    items = "".join(f"<li>{escape(c.describe())}</li>" for c in failed)
    display(HTML(f'<div class="admonition error"><p class="admonition-title">{len(failed)} claim(s) of '
                 f"{escape(chapter)} failed at seed {seed}</p><ul>{items}</ul></div>"))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,2,5"`` -> [0, 2, 5]; ValueError naming the text otherwise."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise ValueError(f"seeds = {text!r} is not valid; expected e.g. '0-4' or '0,2,5'") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds = {text!r} is not valid; expected distinct integers >= 0, e.g. '0-4'")
    return seeds


@dataclass(frozen=True)
class SeedsRow:
    """One claim across seeds: values[i] belongs to seeds[i] (NaN where that seed did not record it)."""

    chapter: str
    name: str
    op: str | None
    bound: float | None
    values: tuple[float, ...]

    @property
    def recorded(self) -> list[float]:
        return [v for v in self.values if not math.isnan(v)]

    @property
    def worst(self) -> float:
        """The seed value closest to failing (min for >=, max for <=; min for a headline number)."""
        vals = self.recorded
        return max(vals) if self.op in ("<=", "<") else min(vals)

    @property
    def margin(self) -> float | None:
        """How far the worst seed is from the bound, in the claim's direction (None without a bound)."""
        if self.op is None:
            return None
        return self.worst - self.bound if self.op in (">=", ">") else self.bound - self.worst

    def required_margin(self) -> float:
        """The stated rule: the worst seed must clear the bound by ``MARGIN_FRACTION`` of its own size and by
        half the spread between seeds (another seed or another CPU moves a number about that much)."""
        vals = self.recorded
        return max(MARGIN_FRACTION * abs(self.worst), 0.5 * (max(vals) - min(vals)))

    def margin_ok(self) -> bool:
        if self.op is None:
            return True
        if self.op in (">=", "<=") and self.bound in (0.0, 1.0) and all(v == self.bound for v in self.values):
            return True  # an exact "none" / "all" claim (a count of 0, a share of 1) that held exactly every time
        return self.margin > 0 and self.margin >= self.required_margin() - 1e-12

    @property
    def holds(self) -> bool:
        return (self.op is None or (len(self.recorded) == len(self.values)
                                    and all(_OPS[self.op](v, self.bound) for v in self.values)))


@dataclass(frozen=True)
class SeedsTable:
    """Every claim of the book for several seeds, with the machine that produced it."""

    preset: str
    seeds: tuple[int, ...]
    cpu: str
    threads: int
    rows: tuple[SeedsRow, ...]

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], preset: str, seeds: Sequence[int], cpu: str,
                     threads: int) -> SeedsTable:
        """Gather the per-chapter records written by ``Claims.verify`` (any order) into one table."""
        seeds = tuple(seeds)
        by_key: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in records:
            for c in rec["claims"]:
                entry = by_key.setdefault((c["chapter"], c["name"]), {"op": c["op"], "bound": c["bound"], "v": {}})
                entry["v"][int(rec["seed"])] = float(c["value"])
                if rec["seed"] == seeds[0] or entry["bound"] is None:  # the bound as the chapter states it now
                    entry["op"], entry["bound"] = c["op"], c["bound"]
        rows = tuple(SeedsRow(ch, name, e["op"], e["bound"], tuple(e["v"].get(s, math.nan) for s in seeds))
                     for (ch, name), e in sorted(by_key.items(), key=lambda kv: kv[0][0]))
        return cls(preset, seeds, cpu, threads, rows)

    @classmethod
    def collect(cls, folder: str | Path, preset: str, seeds: Sequence[int], threads: int) -> SeedsTable:
        """Read ``<folder>/<seed>/*.json`` for the given seeds."""
        records = []
        for s in seeds:
            for f in sorted((Path(folder) / str(s)).glob("[0-9][0-9]_*.json")):
                records.append(json.loads(f.read_text()))
        if not records:
            raise ValueError(f"no claim records under {folder} for seeds {list(seeds)}")
        return cls.from_records(records, preset, seeds, cpu_model(), threads)

    def to_json(self) -> str:
        data = {"preset": self.preset, "seeds": list(self.seeds), "cpu": self.cpu, "threads": self.threads,
                "rows": [{"chapter": r.chapter, "name": r.name, "op": r.op, "bound": r.bound,
                          "values": [None if math.isnan(v) else v for v in r.values]} for r in self.rows]}
        return json.dumps(data, indent=1, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | Path) -> SeedsTable:
        data = json.loads(Path(path).read_text())
        rows = tuple(SeedsRow(r["chapter"], r["name"], r["op"], r["bound"],
                              tuple(math.nan if v is None else float(v) for v in r["values"])) for r in data["rows"])
        return cls(data["preset"], tuple(data["seeds"]), data["cpu"], int(data["threads"]), rows)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json() + "\n")
        os.replace(tmp, path)
        return path

    def failed(self) -> list[SeedsRow]:
        return [r for r in self.rows if not r.holds]

    def records(self) -> list[dict[str, Any]]:
        """One plain row per claim for display: chapter, claim, bound, each seed's value, min, max, margin."""
        out = []
        for r in self.rows:
            vals = r.recorded
            row: dict[str, Any] = {"chapter": r.chapter, "claim": r.name,
                                   "bound": "" if r.op is None else f"{r.op} {r.bound:.4g}"}
            per_seed = zip(self.seeds, r.values, strict=True)
            row.update({f"seed {s}": ("—" if math.isnan(v) else round(v, 4)) for s, v in per_seed})
            row.update({"min": round(min(vals), 4), "max": round(max(vals), 4),
                        "margin": "" if r.margin is None else round(r.margin, 4),
                        "holds": "" if r.op is None else ("yes" if r.holds else "NO")})
            out.append(row)
        return out
