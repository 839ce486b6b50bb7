"""Ground-truth recovery (beyond the paper): how well each concept detects each toy-world factor value.

For every model i, concept k and factor value (f, v): the per-token AUROC of the score ``Z_k^(i)`` (0 where
k is not in the token's code) against the binary label ``truth_f == v`` (-1 = absent, a negative). The AUROC
is exact, ties included: the Mann-Whitney U with average ranks, divided by ``n_pos * n_neg``.

Because most scores are exactly 0, only the nonzero code entries are kept: all zeros of a concept share
one average rank, so ``U`` follows from the ranks of the nonzero entries plus the counts of zeros. The
accumulator stores 12 bytes (token int32, concept int32, value float32) per nonzero entry, i.e. at most
``12 N k M`` bytes (N = 128k toy tokens, k = 32, M = 3: 150 MB), plus the label arrays; the final sort
needs about 3x one model's share transiently. All rank arithmetic is done in int64 with doubled ranks, so
the result is exact up to the final division (rank sums are exact integers in float64 below 6e7 tokens).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from usae._io import load_tensors, save_tensors
from usae.stats.firing import check_codes, encoded_batches

__all__ = ["GroundTruthStats", "GroundTruthAccumulator", "ground_truth_stats", "SparseRanks", "sparse_ranks",
           "auroc_table", "auroc_from_sparse", "group_truth", "metric_agreement"]


def _as_labels(name: str, labels: Any, n_tokens: int) -> Tensor:
    arr = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels[{name!r}] has dtype {arr.dtype}; expected an integer array (-1 = absent)")
    lab = torch.from_numpy(np.array(arr, dtype=np.int64).reshape(-1))  # a copy: store labels are read-only
    if lab.numel() != n_tokens:
        raise ValueError(f"labels[{name!r}] has {lab.numel()} entries; expected one per token ({n_tokens})")
    if lab.numel() and int(lab.min()) < -1:
        raise ValueError(f"labels[{name!r}] has value {int(lab.min())}; valid labels are -1 (absent) or >= 0")
    return lab


class SparseRanks(NamedTuple):
    """Average ranks of one model's nonzero code entries among all N scores of their concept.

    concepts, tokens: [E] int64 (sorted by concept, then value); rank2: [E] int64 doubled average rank
    among all N tokens (ties averaged, the zeros of a concept ranked first); zeros: [m] tokens scoring 0.
    """

    concepts: np.ndarray
    tokens: np.ndarray
    rank2: np.ndarray
    zeros: np.ndarray
    n_tokens: int


def sparse_ranks(tokens: Tensor, concepts: Tensor, values: Tensor, n_tokens: int, n_latents: int) -> SparseRanks:
    """Rank the nonzero entries ([E] each, values > 0, each (token, concept) at most once) per concept."""
    val = values.detach().cpu().numpy().astype(np.float32)
    if val.size and not (val > 0).all():
        raise ValueError("sparse_ranks: values must be the nonzero (> 0) code entries")
    con = concepts.cpu().numpy().astype(np.int64)
    key = (con << 32) | val.view(np.int32).astype(np.int64)  # positive float32 bits order like the floats
    order = np.argsort(key)
    key, con, tok = key[order], con[order], tokens.cpu().numpy()[order].astype(np.int64)
    nnz = np.bincount(con, minlength=n_latents)
    start = np.cumsum(nnz) - nnz                                   # first sorted position of each concept
    new_group = np.ones(key.shape[0], dtype=bool)
    new_group[1:] = key[1:] != key[:-1]
    group = np.cumsum(new_group) - 1                               # tie group of (concept, value)
    first = np.flatnonzero(new_group)
    size = np.diff(first, append=key.shape[0])
    pos = first - start[con[first]]                                # 0-based rank of the group in its concept
    zeros = n_tokens - nnz
    rank2 = (2 * pos + size + 1)[group] + 2 * zeros[con]
    return SparseRanks(con, tok, rank2, zeros, n_tokens)


def auroc_table(ranks: SparseRanks, labels: Tensor, n_values: int) -> Tensor:
    """[m, n_values] exact AUROC of each concept against ``labels == v`` (labels: [N] int64, -1 negative).

    NaN where a value has no positive or no negative token. Rank sums are exact for N < 6e7 tokens.
    """
    m, n = ranks.zeros.shape[0], ranks.n_tokens
    lab_all = labels.cpu().numpy()
    lab = lab_all[ranks.tokens]
    keep = lab >= 0
    cell = ranks.concepts[keep] * n_values + lab[keep]
    pos_nz = np.bincount(cell, minlength=m * n_values).reshape(m, n_values)
    rank2_nz = np.bincount(cell, weights=ranks.rank2[keep], minlength=m * n_values).reshape(m, n_values)
    n_pos = np.bincount(lab_all[lab_all >= 0], minlength=n_values)[:n_values].astype(np.int64)
    r2 = (n_pos - pos_nz) * (ranks.zeros + 1)[:, None] + np.rint(rank2_nz).astype(np.int64)
    u2 = r2 - n_pos * (n_pos + 1)
    denom = 2 * n_pos * (n - n_pos)
    auc = np.where(denom > 0, u2 / np.maximum(denom, 1), np.nan)
    return torch.from_numpy(np.broadcast_to(auc, (m, n_values)).astype(np.float64))


def auroc_from_sparse(tokens: Tensor, concepts: Tensor, values: Tensor, labels: Tensor, n_latents: int,
                      n_values: int) -> Tensor:
    """[n_latents, n_values] AUROC from one model's nonzero entries over ``labels.shape[0]`` tokens."""
    return auroc_table(sparse_ranks(tokens, concepts, values, int(labels.shape[0]), n_latents), labels, n_values)


@dataclass
class GroundTruthStats:
    """AUROC of every (model, concept) against every factor value.

    auroc: factor -> [M, m, V_f] float64 (NaN where a value has no positive or no negative token).
    n_positive: factor -> [V_f] int64 tokens per value.  value_names: factor -> names, where known.
    """

    names: tuple[str, ...]
    n_tokens: int
    auroc: dict[str, Tensor]
    n_positive: dict[str, Tensor]
    value_names: dict[str, tuple[str, ...]]

    @property
    def factors(self) -> tuple[str, ...]:
        return tuple(self.auroc)

    def _model(self, model: str | None) -> int | None:
        if model is None:
            return None
        if model not in self.names:
            raise ValueError(f"model = {model!r} is not one of {list(self.names)}")
        return self.names.index(model)

    def table(self, factor: str, model: str | None = None) -> Tensor:
        """[m, V] AUROC of ``model``, or with ``model=None`` the worst model's (min over models; NaN-aware)."""
        if factor not in self.auroc:
            raise ValueError(f"factor = {factor!r} is not one of {list(self.factors)}")
        a = self.auroc[factor]
        i = self._model(model)
        return a[i] if i is not None else a.min(0).values

    def best_concept_per_value(self, factor: str, model: str | None = None,
                               concepts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """For each value of ``factor``: (best concept id [V], its AUROC [V]) of ``model`` or the worst model.

        ``concepts`` restricts the candidates (e.g. universal ones); -1 / NaN where nothing is defined.
        """
        t = self.table(factor, model).nan_to_num(-math.inf)
        if concepts is not None:
            allowed = torch.zeros(t.shape[0], dtype=torch.bool)
            allowed[torch.as_tensor(concepts, dtype=torch.int64)] = True
            t = torch.where(allowed.unsqueeze(1), t, torch.full_like(t, -math.inf))
        best = t.max(0)
        ok = torch.isfinite(best.values)
        return torch.where(ok, best.indices, -1), torch.where(ok, best.values, math.nan)

    def best_value_per_concept(self, model: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """For each concept: (factor index into ``factors`` [m], value [m], AUROC [m]) of its best match."""
        best_f = best_v = best_a = None
        for fi, f in enumerate(self.factors):
            t = self.table(f, model).nan_to_num(-math.inf).max(1)
            if best_a is None:
                best_f, best_v, best_a = torch.full_like(t.indices, fi), t.indices, t.values
            else:
                better = t.values > best_a
                best_f = torch.where(better, fi, best_f)
                best_v = torch.where(better, t.indices, best_v)
                best_a = torch.where(better, t.values, best_a)
        return best_f, best_v, torch.where(torch.isfinite(best_a), best_a, math.nan)

    def best_universal(self, factor: str) -> tuple[int, int, float]:
        """(value, concept, AUROC in its worst model) of the factor value that ONE concept detects best in its
        worst model; (-1, -1, NaN) when no value has positives."""
        ids, auc = self.best_concept_per_value(factor, None)
        if not torch.isfinite(auc).any():
            return -1, -1, math.nan
        v = int(auc.nan_to_num(-math.inf).argmax())
        return v, int(ids[v]), float(auc[v])

    def value_name(self, factor: str, value: int) -> str:
        """The name of ``value`` of ``factor`` (its index as text when unnamed)."""
        names = self.value_names.get(factor) or ()
        return names[value] if 0 <= value < len(names) else str(value)

    def recovered(self, threshold: float = 0.95, concepts: Tensor | None = None) -> dict[str, Tensor]:
        """factor -> [V] bool: some concept (of ``concepts``, if given) has AUROC >= ``threshold`` in every model."""
        return {f: self.best_concept_per_value(f, None, concepts)[1].nan_to_num(-1.0) >= threshold
                for f in self.factors}

    def n_recovered(self, threshold: float = 0.95, concepts: Tensor | None = None) -> tuple[int, int]:
        """(factor values recovered by a universal concept, factor values with positives)."""
        rec = self.recovered(threshold, concepts)
        return (sum(int(r.sum()) for r in rec.values()),
                sum(int((self.n_positive[f] > 0).sum()) for f in self.factors))

    def save(self, path: str | Path) -> None:
        """safetensors (tensors ``auroc.<factor>``, ``n_positive.<factor>``) + JSON metadata; atomic."""
        tensors = {f"auroc.{f}": a.contiguous() for f, a in self.auroc.items()}
        tensors.update({f"n_positive.{f}": c.contiguous() for f, c in self.n_positive.items()})
        save_tensors(path, tensors, {"json": json.dumps({
            "names": list(self.names), "n_tokens": self.n_tokens, "factors": list(self.factors),
            "value_names": {f: list(v) for f, v in self.value_names.items()}})})

    @classmethod
    def load(cls, path: str | Path) -> GroundTruthStats:
        tensors, raw = load_tensors(path)
        meta = json.loads(raw["json"])
        return cls(tuple(meta["names"]), int(meta["n_tokens"]),
                   {f: tensors[f"auroc.{f}"] for f in meta["factors"]},
                   {f: tensors[f"n_positive.{f}"] for f in meta["factors"]},
                   {f: tuple(v) for f, v in meta["value_names"].items()})


class GroundTruthAccumulator:
    """Keeps the nonzero code entries of every model over a stream of batches (see the module docstring)."""

    def __init__(self, names: Sequence[str], n_latents: int) -> None:
        if len(names) == 0 or len(set(names)) != len(names):
            raise ValueError(f"names = {list(names)!r}: expected one or more distinct model names")
        self.names, self.n_latents, self.n_tokens = tuple(names), int(n_latents), 0
        self._parts: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {n: [] for n in self.names}

    @torch.no_grad()
    def update(self, codes: Mapping[str, Any]) -> None:
        """Add one batch ``{name: SparseCode [B, k]}`` of the same B tokens (the next B in label order)."""
        n = check_codes(codes, self.names, self.n_latents)
        if self.n_tokens + n >= 2**31:
            raise ValueError("more than 2^31 tokens; ground-truth AUROC is meant for the toy world")
        for name in self.names:
            values, idx = codes[name].values.detach().cpu(), codes[name].indices.cpu()
            row, col = torch.nonzero(values > 0, as_tuple=True)
            self._parts[name].append(((row + self.n_tokens).int(), idx[row, col].int(), values[row, col].float()))
        self.n_tokens += n

    def result(self, labels: Mapping[str, Any], n_values: Mapping[str, int] | None = None,
               value_names: Mapping[str, Sequence[str]] | None = None) -> GroundTruthStats:
        """AUROC tables against ``labels`` (factor -> [N] int, -1 = absent, in the order tokens were added).

        ``n_values``: values per factor (default: max label + 1); ``value_names`` also sets it.
        """
        if not labels:
            raise ValueError("labels is empty; expected factor -> [N] integer array")
        names = {f: tuple(v) for f, v in (value_names or {}).items() if f in labels}
        labs = {f: _as_labels(f, a, self.n_tokens) for f, a in labels.items()}
        counts = {}
        for f, lab in labs.items():
            top = int(lab.max()) + 1 if lab.numel() else 0
            want = (n_values or {}).get(f, len(names[f]) if f in names else top)
            if want < top:
                raise ValueError(f"labels[{f!r}] has value {top - 1}; expected values < n_values = {want}")
            counts[f] = max(int(want), 1)
        auroc: dict[str, list[Tensor]] = {f: [] for f in labs}
        for name in self.names:
            parts = self._parts[name]
            tok, con, val = (torch.cat([p[j] for p in parts]) if parts else torch.zeros(0, dtype=dt)
                             for j, dt in enumerate((torch.int32, torch.int32, torch.float32)))
            ranks = sparse_ranks(tok, con, val, self.n_tokens, self.n_latents)
            del tok, con, val
            for f, lab in labs.items():
                auroc[f].append(auroc_table(ranks, lab, counts[f]))
        n_pos = {f: torch.bincount(lab[lab >= 0], minlength=counts[f])[:counts[f]] for f, lab in labs.items()}
        return GroundTruthStats(self.names, self.n_tokens, {f: torch.stack(a) for f, a in auroc.items()},
                                n_pos, names)


def ground_truth_stats(model: Any, acts: Any, labels: Mapping[str, Any] | None = None, split: str = "val",
                       batch_size: int = 8192, n_values: Mapping[str, int] | None = None,
                       value_names: Mapping[str, Sequence[str]] | None = None,
                       progress: bool = True) -> GroundTruthStats:
    """Encode ``acts`` (rows in order; see ``usae.stats.firing.encoded_batches``) and score against the truth.

    ``labels`` default to ``acts.labels(split)`` (an ActivationStore's per-token truth). Pass
    ``value_names=usae.data.toyworld.FACTORS`` to name the values.
    """
    if labels is None:
        if not hasattr(acts, "labels"):
            raise ValueError("labels not given and acts has no .labels(split); pass factor -> [N] int arrays")
        labels = acts.labels(split)
    acc = GroundTruthAccumulator(model.names, model.n_latents)
    for codes in encoded_batches(model, acts, split, batch_size, progress, desc="ground truth"):
        acc.update(codes)
    return acc.result(labels, n_values, value_names)


def group_truth(gt: GroundTruthStats, groups: Mapping[str, Tensor], threshold: float = 0.9) -> list[dict[str, Any]]:
    """Per concept group (name -> [m] bool mask): how well its concepts match ONE truth value in every model.

    For each concept the best factor value by its worst model's AUROC (``best_value_per_concept(None)``);
    per group: count, median of that AUROC, the share >= ``threshold``, and the most common best factor.
    """
    best_f, _, best_a = gt.best_value_per_concept(None)
    rows = []
    for label, mask in groups.items():
        ids = torch.nonzero(torch.as_tensor(mask, dtype=torch.bool)).reshape(-1)
        a = best_a[ids].nan_to_num(0.5)
        top_factor = gt.factors[int(torch.mode(best_f[ids]).values)] if len(ids) else "-"
        rows.append({"group": label, "concepts": int(len(ids)),
                     "median worst-model AUROC": float(a.median()) if len(ids) else math.nan,
                     f"share >= {threshold}": float((a >= threshold).double().mean()) if len(ids) else math.nan,
                     "most common best factor": top_factor})
    return rows


def metric_agreement(gt: GroundTruthStats, stats: Any, min_entropy: float = 0.9) -> dict[str, float]:
    """Spearman rank correlations between the paper's metrics and the truth, over fired concepts.

    Truth score of a concept: its best single-value AUROC in its worst model (``best_value_per_concept(None)``).
    ``"entropy"``: firing entropy vs that score; ``"worst-model CFP"``: min over models of the co-fire
    proportion vs that score; ``"worst-model CFP, entropy >= min_entropy"``: the same among even-firing concepts.
    """
    from scipy.stats import spearmanr

    best = gt.best_value_per_concept(None)[2].nan_to_num(0.5)
    fired = ~stats.never_fired
    ent = stats.entropy.nan_to_num(0.0)
    cfp = stats.cofire_proportion.nan_to_num(0.0).min(0).values
    even = fired & (ent >= min_entropy)

    def rho(x: Tensor, y: Tensor) -> float:
        return float(spearmanr(x.numpy(), y.numpy()).statistic) if len(x) > 2 else math.nan

    return {"entropy": rho(ent[fired], best[fired]), "worst-model CFP": rho(cfp[fired], best[fired]),
            f"worst-model CFP, entropy >= {min_entropy}": rho(cfp[even], best[even])}

