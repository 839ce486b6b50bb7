"""Concept consistency: a model's USAE atoms vs its independent SAE's atoms (paper Fig. 7 and Fig. 16).

For one backbone: cosine similarity between the USAE decoder atoms ``D^(i)`` [m, d] and an independently
trained SAE's atoms [m', d]; a one-to-one Hungarian matching that maximises the total cosine
(``scipy.optimize.linear_sum_assignment``); and what the paper reports of it: the matched-similarity
distribution, the fraction of concepts with CS > 0.5, and the "AUC" of the fraction-above-threshold curve.
That AUC over thresholds in [0, 1] equals exactly ``mean(clip(CS, 0, 1))`` (≈ the mean matched CS).

Random baseline: atoms drawn from a Normal with the independent dictionary's mean and variance (``"scalar"``,
the recommended reading, or ``"per_dim"``), seeded, matched the same way (paper: AUC 0.13).

Subsets (Fig. 16, e.g. the top co-firing concepts): ``rematch=False`` keeps the matching of the whole
dictionary and reads off the subset's pairs; ``rematch=True`` recomputes the Hungarian matching between the
subset's atoms and the whole independent dictionary. The paper does not say which it used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

BASELINE_STATS = ("scalar", "per_dim")
__all__ = ["cosine_matrix", "Matching", "hungarian_match", "random_dictionary", "ConsistencyReport", "consistency",
           "Movement", "dictionary_movement",
           "BASELINE_STATS"]


def _check_atoms(name: str, atoms: Tensor) -> Tensor:
    if not isinstance(atoms, Tensor) or atoms.dim() != 2 or atoms.shape[0] == 0:
        shape = tuple(atoms.shape) if isinstance(atoms, Tensor) else type(atoms).__name__
        raise ValueError(f"{name} has shape {shape}; expected a non-empty [n_atoms, d] tensor")
    return atoms.detach().double().cpu()


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[n_a, n_b] cosine similarity between the rows of ``a`` [n_a, d] and ``b`` [n_b, d] (float64)."""
    a, b = _check_atoms("a", a), _check_atoms("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"atoms have widths {a.shape[1]} and {b.shape[1]}; both must be the model's width d")
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


@dataclass
class Matching:
    """A one-to-one matching: ``rows[j]`` (an atom of ``a``) paired with ``cols[j]`` (an atom of ``b``).

    rows, cols: [n] int64 (rows ascending); similarity: [n] float64 cosine of each pair.
    """

    rows: Tensor
    cols: Tensor
    similarity: Tensor

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def mean(self) -> float:
        return float(self.similarity.mean())

    def fraction_above(self, threshold: float = 0.5) -> float:
        """Fraction of matched pairs with cosine > ``threshold`` (paper: a "match" at 0.5)."""
        return float((self.similarity > threshold).double().mean())

    def curve(self, n_points: int = 101) -> tuple[Tensor, Tensor]:
        """(thresholds [n_points] over [0, 1], fraction of pairs with cosine > threshold [n_points])."""
        t = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64)
        return t, (self.similarity.unsqueeze(0) > t.unsqueeze(1)).double().mean(1)

    @property
    def auc(self) -> float:
        """Exact area under :meth:`curve` on [0, 1]: ``mean(clip(CS, 0, 1))``."""
        return float(self.similarity.clamp(0.0, 1.0).mean())

    def subset(self, rows: Tensor) -> Matching:
        """The pairs whose ``a`` atom is in ``rows`` (order of ``rows``); atoms left unmatched are dropped."""
        pos = torch.full((int(self.rows.max()) + 1,), -1, dtype=torch.int64)
        pos[self.rows] = torch.arange(len(self))
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if rows.numel() and (rows.min() < 0):
            raise ValueError("subset rows must be non-negative atom indices")
        inside = rows < pos.shape[0]
        p = torch.full_like(rows, -1)
        p[inside] = pos[rows[inside]]
        p = p[p >= 0]
        return Matching(self.rows[p], self.cols[p], self.similarity[p])

    def summary(self, threshold: float = 0.5) -> dict[str, float]:
        return {"n": len(self), "mean": self.mean, "auc": self.auc,
                "fraction_above": self.fraction_above(threshold), "threshold": threshold}


def hungarian_match(a: Tensor, b: Tensor) -> Matching:
    """One-to-one matching of the rows of ``a`` [n_a, d] to the rows of ``b`` [n_b, d] maximising total cosine.

    ``min(n_a, n_b)`` pairs. Cost: an n_a x n_b float64 matrix (6144^2: 0.3 GB) and scipy's O(n^3) solver.
    """
    sim = cosine_matrix(a, b)
    r, c = linear_sum_assignment(sim.numpy(), maximize=True)
    rows, cols = torch.from_numpy(r.astype(np.int64)), torch.from_numpy(c.astype(np.int64))
    return Matching(rows, cols, sim[rows, cols])


def random_dictionary(reference: Tensor, n_atoms: int | None = None, stats: str = "scalar",
                      seed: int = 0) -> Tensor:
    """[n_atoms, d] Normal atoms with the mean and variance of ``reference`` [n_ref, d] (float32, seeded).

    ``stats="scalar"``: one mean and variance over all entries; ``"per_dim"``: per column.
    """
    if stats not in BASELINE_STATS:
        raise ValueError(f"stats = {stats!r} is not valid; expected one of {list(BASELINE_STATS)}")
    ref = _check_atoms("reference", reference)
    n = ref.shape[0] if n_atoms is None else int(n_atoms)
    if n <= 0:
        raise ValueError(f"n_atoms = {n_atoms}: expected a positive integer")
    if stats == "scalar":
        mean, std = ref.mean(), ref.std() if ref.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
    else:
        mean, std = ref.mean(0), ref.std(0) if ref.shape[0] > 1 else torch.ones(ref.shape[1], dtype=torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(n, ref.shape[1], generator=gen, dtype=torch.float64)
    return (mean + std * noise).float()


@dataclass
class ConsistencyReport:
    """Everything Fig. 7 / Fig. 16 need for one model (summaries are dicts from :meth:`Matching.summary`)."""

    matching: Matching                 # USAE atoms (rows) vs independent SAE atoms (cols)
    baseline: Matching                 # random atoms (rows) vs independent SAE atoms (cols)
    subset: Matching | None            # the subset's pairs (see ``rematch``), or None
    rematch: bool

    def summary(self, threshold: float = 0.5) -> dict[str, dict[str, float] | None]:
        return {"all": self.matching.summary(threshold), "baseline": self.baseline.summary(threshold),
                "subset": None if self.subset is None else self.subset.summary(threshold)}


def consistency(usae_atoms: Tensor, sae_atoms: Tensor, subset: Tensor | None = None, rematch: bool = False,
                baseline_stats: str = "scalar", seed: int = 0) -> ConsistencyReport:
    """Match one model's USAE atoms [m, d] to its independent SAE's atoms [m', d], with the random baseline.

    ``subset``: USAE concept ids (e.g. the top 1000 by co-fire count) to also report on; ``rematch`` says
    whether their matching is recomputed on the subset alone (True) or read off the full matching (False).
    """
    full = hungarian_match(usae_atoms, sae_atoms)
    base = hungarian_match(random_dictionary(sae_atoms, usae_atoms.shape[0], baseline_stats, seed), sae_atoms)
    sub = None
    if subset is not None:
        ids = torch.as_tensor(subset, dtype=torch.int64).reshape(-1)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= usae_atoms.shape[0]:
            got = f"[{int(ids.min())}, {int(ids.max())}]" if ids.numel() else "no ids"
            raise ValueError(f"subset must hold concept ids in [0, {usae_atoms.shape[0]}); got {got}")
        if rematch:
            m = hungarian_match(usae_atoms[ids], sae_atoms)
            sub = Matching(ids[m.rows], m.cols, m.similarity)
        else:
            sub = full.subset(ids)
    return ConsistencyReport(full, base, sub, rematch)


@dataclass(frozen=True)
class Movement:
    """How far one model's atoms moved in training. cosine: [m] cosine of each trained atom to its initial
    value; live: [m] bool, the atom's concept fires at least once on the validation tokens."""

    model: str
    cosine: Tensor
    live: Tensor

    @property
    def median(self) -> float:
        return float(self.cosine.median())

    @property
    def median_live(self) -> float:
        """Median cosine to the initial atom among live concepts (NaN when none is live)."""
        return float(self.cosine[self.live].median()) if bool(self.live.any()) else float("nan")

    @property
    def live_fraction(self) -> float:
        return float(self.live.float().mean())

    def moved(self, threshold: float = 0.9) -> float:
        """Share of atoms whose cosine to their initial value fell below ``threshold``."""
        return float((self.cosine < threshold).float().mean())


def dictionary_movement(initial: dict[str, Tensor], trained: dict[str, Tensor], fires: Tensor,
                        names: tuple[str, ...] | list[str]) -> dict[str, Movement]:
    """Per model: cosine of each trained atom [m, d] to the same row of the initial dictionary [m, d], and which
    concepts fire (``fires`` [M, m] from ``firing.firing_stats``, ``names`` its row order)."""
    if fires.dim() != 2 or fires.shape[0] != len(names):
        raise ValueError(f"fires has shape {tuple(fires.shape)}; expected [{len(names)}, m] for models {list(names)}")
    out = {}
    for i, name in enumerate(names):
        a, b = _check_atoms(f"initial[{name!r}]", initial[name]), _check_atoms(f"trained[{name!r}]", trained[name])
        if a.shape != b.shape or a.shape[0] != fires.shape[1]:
            raise ValueError(f"{name}: initial {tuple(a.shape)} and trained {tuple(b.shape)} atoms must have the same "
                             f"shape [m={fires.shape[1]}, d]")
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        out[name] = Movement(name, cos, fires[i] > 0)
    return out
