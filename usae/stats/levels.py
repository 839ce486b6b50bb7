"""Universality by level of abstraction, judged against the toy world's truth (beyond the paper).

From a ``GroundTruthStats`` (``usae.stats.groundtruth``) and the zoo's task design: which factor values ONE
concept detects in every model, per factor and per level (:func:`factor_recovery`, :func:`level_recovery`);
which concept each model uses as its best detector of each value of a factor (:func:`best_detectors`: one
concept in every model is a shared detector, one concept for several values merges them); the paper's
universality bar scored as a detector of truly universal concepts (:func:`bar_detection`); and
a linear probe of a model's tokens, which tells whether a model encodes a factor at all (:func:`linear_probe`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from usae.stats.groundtruth import GroundTruthStats

__all__ = ["FactorRecovery", "factor_recovery", "LevelRecovery", "level_recovery", "BestDetectors", "best_detectors",
           "BarDetection", "bar_detection", "ProbeResult", "linear_probe"]


@dataclass(frozen=True)
class FactorRecovery:
    """How one factor came out against what the zoo's tasks demanded of it (``usae.data.toyzoo.task_design``).

    values: values with positive tokens. universal: values detected by ONE concept at AUROC >= threshold in
    every model. per_model: values detected by some concept of each model on its own (order of ``names``).
    """

    factor: str
    level: str
    expected: str
    needed_by: tuple[str, ...]
    names: tuple[str, ...]
    values: int
    universal: int
    per_model: tuple[int, ...]

    @property
    def universal_share(self) -> float:
        return self.universal / self.values if self.values else math.nan

    @property
    def outside(self) -> int:
        """Most values detected in one model whose task does not need the factor (0 when every model needs it)."""
        return max((c for n, c in zip(self.names, self.per_model, strict=True) if n not in self.needed_by), default=0)

    @property
    def inside(self) -> int:
        """Fewest values detected in one model whose task needs the factor (0 when none needs it)."""
        return min((c for n, c in zip(self.names, self.per_model, strict=True) if n in self.needed_by), default=0)

    def row(self) -> dict[str, Any]:
        """A plain row for display."""
        out: dict[str, Any] = {"level": self.level, "factor": self.factor, "design": self.expected,
                               "needed by": ", ".join(self.needed_by) or "-", "values": self.values,
                               "one concept, every model": self.universal}
        out.update(dict(zip(self.names, self.per_model, strict=True)))
        return out


def factor_recovery(gt: GroundTruthStats, design: Sequence[Any], threshold: float = 0.9) -> list[FactorRecovery]:
    """One :class:`FactorRecovery` per row of ``design`` (rows with ``factor``, ``level``, ``models`` and
    ``expected``, e.g. ``usae.data.toyzoo.task_design()``) whose factor ``gt`` scored."""
    out = []
    for d in design:
        if d.factor not in gt.auroc:
            raise ValueError(f"design factor {d.factor!r} was not scored; scored factors are {list(gt.factors)}")
        present = int((gt.n_positive[d.factor] > 0).sum())
        uni = gt.best_concept_per_value(d.factor, None)[1].nan_to_num(-1.0) >= threshold
        per = tuple(int((gt.best_concept_per_value(d.factor, n)[1].nan_to_num(-1.0) >= threshold).sum())
                    for n in gt.names)
        out.append(FactorRecovery(d.factor, d.level, d.expected, tuple(d.models), gt.names, present,
                                  int(uni.sum()), per))
    return out


@dataclass(frozen=True)
class LevelRecovery:
    """Per level of abstraction: the share of its by-design universal factor values that ONE concept detects
    in every model, and of its by-design unique (or pairwise) factors the most values a model whose task
    does not need them detects."""

    level: str
    universal_factors: tuple[str, ...]
    universal_values: int
    universal_recovered: int
    specific_factors: tuple[str, ...]
    specific_outside: int

    @property
    def universal_share(self) -> float:
        return self.universal_recovered / self.universal_values if self.universal_values else math.nan


def level_recovery(rows: Sequence[FactorRecovery]) -> list[LevelRecovery]:
    """Group :func:`factor_recovery` rows by level, in the order levels first appear."""
    levels = list(dict.fromkeys(r.level for r in rows))
    out = []
    for lv in levels:
        uni = [r for r in rows if r.level == lv and r.expected == "universal"]
        spec = [r for r in rows if r.level == lv and r.expected in ("unique", "pairwise")]
        out.append(LevelRecovery(lv, tuple(r.factor for r in uni), sum(r.values for r in uni),
                                 sum(r.universal for r in uni), tuple(r.factor for r in spec),
                                 max((r.outside for r in spec), default=0)))
    return out


@dataclass(frozen=True)
class BestDetectors:
    """For each present value of one factor, each model's best single concept as a detector of it.

    concepts: [M, V] concept ids (order of ``names`` and ``values``); auroc: [M, V] their AUROC.
    """

    factor: str
    names: tuple[str, ...]
    values: tuple[str, ...]
    concepts: Tensor
    auroc: Tensor

    @property
    def distinct(self) -> int:
        """How many different concepts are the best detector of some value in some model (1 .. M * V)."""
        return len(set(self.concepts.reshape(-1).tolist()))

    def rows(self) -> list[dict[str, Any]]:
        """One plain row per value: each model's best concept and its AUROC, for display."""
        return [{self.factor: v, **{n: f"c{int(self.concepts[i, j])} ({float(self.auroc[i, j]):.2f})"
                                    for i, n in enumerate(self.names)}} for j, v in enumerate(self.values)]


def best_detectors(gt: GroundTruthStats, factor: str) -> BestDetectors:
    """Each model's best concept for each value of ``factor`` that has positive tokens."""
    if factor not in gt.factors:
        raise ValueError(f"factor = {factor!r} is not valid; expected one of {list(gt.factors)}")
    present = [v for v in range(len(gt.n_positive[factor])) if int(gt.n_positive[factor][v]) > 0]
    best = [gt.best_concept_per_value(factor, n) for n in gt.names]
    return BestDetectors(factor, tuple(gt.names), tuple(gt.value_name(factor, v) for v in present),
                         torch.stack([b[0][present] for b in best]), torch.stack([b[1][present] for b in best]))


@dataclass(frozen=True)
class BarDetection:
    """The paper's universality bar (entropy > ``min_entropy`` and co-fire proportion > t in every model) as a
    detector of true universality, for every CFP threshold t.

    Truly universal: a concept whose best single factor value it detects at AUROC >= ``auroc`` in its worst
    model (one concept, one value, every model); ``truly_universal``: their ids [n_true]. thresholds,
    precision, recall, f1, kept: [T] (precision NaN where the bar keeps nothing). ``n_true``: truly
    universal fired concepts.
    """

    thresholds: Tensor
    truly_universal: Tensor
    precision: Tensor
    recall: Tensor
    f1: Tensor
    kept: Tensor
    n_true: int
    min_entropy: float
    auroc: float

    def at(self, threshold: float) -> tuple[float, float, int]:
        """(precision, recall, concepts kept) at the CFP threshold nearest ``threshold``."""
        i = int((self.thresholds - threshold).abs().argmin())
        return float(self.precision[i]), float(self.recall[i]), int(self.kept[i])

    @property
    def best_threshold(self) -> float:
        """The CFP threshold with the highest F1 (the smallest such threshold on ties)."""
        return float(self.thresholds[int(self.f1.nan_to_num(-1.0).argmax())])


def bar_detection(gt: GroundTruthStats, stats: Any, min_entropy: float = 0.9, auroc: float = 0.9,
                  thresholds: Tensor | None = None) -> BarDetection:
    """Score the paper's bar against the truth over fired concepts (see :class:`BarDetection`).

    ``thresholds``: CFP thresholds [T] (default 0, 0.025, ..., 0.95).
    """
    t = torch.arange(0, 0.951, 0.025, dtype=torch.float64) if thresholds is None else \
        torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
    fired = ~stats.never_fired
    truth = (gt.best_value_per_concept(None)[2].nan_to_num(0.0) >= auroc) & fired
    even = fired & (stats.entropy.nan_to_num(0.0) > min_entropy)
    worst = stats.cofire_proportion.nan_to_num(0.0).min(0).values.double()
    kept = even[None, :] & (worst[None, :] > t[:, None])                           # [T, m]
    tp = (kept & truth[None, :]).sum(1).double()
    n_kept = kept.sum(1)
    precision = torch.where(n_kept > 0, tp / n_kept.clamp(min=1), torch.tensor(math.nan, dtype=torch.float64))
    n_true = int(truth.sum())
    recall = tp / n_true if n_true else torch.full_like(tp, math.nan)
    f1 = torch.where(tp > 0, 2 * tp / (n_kept + n_true), torch.zeros_like(tp))
    return BarDetection(t, torch.nonzero(truth).reshape(-1), precision, recall, f1, n_kept, n_true,
                        float(min_entropy), float(auroc))


@dataclass(frozen=True)
class ProbeResult:
    """A linear probe of one model's tokens for one factor: accuracy on the labelled tokens of the evaluation
    split (fitted on the fitting split) and chance (the most common value's share there)."""

    model: str
    factor: str
    accuracy: float
    chance: float
    n_fit: int
    n_eval: int


def linear_probe(store: Any, model: str, factor: str, fit_split: str = "train", eval_split: str = "val",
                 ridge: float = 1e-3, batch_size: int = 16384) -> ProbeResult:
    """Ridge-regression probe (one-hot targets, argmax) of ``model``'s tokens for ``factor``, on the tokens
    where the factor is present (label >= 0). Streams the store: memory is [d + 1, d + 1] plus one batch.

    Tells whether a model *encodes* a factor linearly, whatever a USAE later does with it.
    """
    fit_labels, eval_labels = store.labels(fit_split), store.labels(eval_split)
    if factor not in fit_labels or factor not in eval_labels:
        raise ValueError(f"factor = {factor!r} has no labels in splits {fit_split!r}/{eval_split!r}; labelled "
                         f"factors are {sorted(fit_labels)}")
    n_values = int(max(np.max(fit_labels[factor]), np.max(eval_labels[factor]))) + 1
    if n_values < 2:
        raise ValueError(f"factor = {factor!r} has fewer than two values present; nothing to probe")
    d = store.dims[model]
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(d + 1, n_values, dtype=torch.float64)
    n_fit = 0
    for lo in range(0, store.n_rows(fit_split), batch_size):
        hi = min(lo + batch_size, store.n_rows(fit_split))
        y = torch.from_numpy(np.array(fit_labels[factor][lo:hi], dtype=np.int64))
        keep = y >= 0
        x = torch.cat([store.rows(fit_split, model, lo, hi)[keep].double(), torch.ones(int(keep.sum()), 1,
                                                                                         dtype=torch.float64)], 1)
        gram += x.T @ x
        cross += x.T @ torch.nn.functional.one_hot(y[keep], n_values).double()
        n_fit += int(keep.sum())
    if n_fit == 0:
        raise ValueError(f"factor = {factor!r} is absent from every token of split {fit_split!r}")
    scale = float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + ridge * scale * torch.eye(d + 1, dtype=torch.float64), cross)
    hits = n_eval = 0
    counts = torch.zeros(n_values, dtype=torch.int64)
    for lo in range(0, store.n_rows(eval_split), batch_size):
        hi = min(lo + batch_size, store.n_rows(eval_split))
        y = torch.from_numpy(np.array(eval_labels[factor][lo:hi], dtype=np.int64))
        keep = y >= 0
        x = store.rows(eval_split, model, lo, hi)[keep].double()
        pred = (x @ w[:-1] + w[-1]).argmax(1)
        hits += int((pred == y[keep]).sum())
        n_eval += int(keep.sum())
        counts += torch.bincount(y[keep], minlength=n_values)
    return ProbeResult(model, factor, hits / max(n_eval, 1), float(counts.max()) / max(n_eval, 1), n_fit, n_eval)
