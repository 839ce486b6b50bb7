"""Fires, co-fires, energy, firing entropy and co-fire proportion of a USAE's concepts, in one streaming pass.

Definitions (paper Sec. 3.4 / Eq. 9-14; official-code variants where they differ):

- fires ``|F_k^(i)|``: tokens where concept k of model i's code is ``> threshold`` (strict, tau = 0.1).
- co-fires ``|C_k|``: tokens where concept k is ``> threshold`` in *every* model's code at once.
- energy (Eq. 9): ``||E[Z_k^(i)] D_k^(i)||^2``; with unit-norm atoms that is ``E[Z_k^(i)]^2``. The official
  code uses the unsquared norm (``variant="code"``). Aggregated energy: the sum over models.
- firing entropy (Eq. 12-13): entropy of ``p_k^(i) = |F_k^(i)| / sum_j |F_k^(j)|`` over models, divided by
  ``log M``; concepts that never fire are NaN here (the official code puts them at 0).
- co-fire proportion (Eq. 14): ``|C_k| / |F_k^(i)|``; the official "cofire IoU": ``|C_k| / sum_i |F_k^(i)|``.

Codes are never densified: a batch costs O(N k M) memory and the accumulator O(M m), so ImageNet-val
(9.8 M tokens x 3 models, m = 6144, k = 32) fits in well under 4 GB (see ``usae.perf.stats``). Each code row
must hold distinct indices (true for TopK codes).

Fig. 6's summaries of these statistics are in ``usae.stats.universality``, concept selection in ``usae.stats.concepts``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from usae._checks import positive_int
from usae._io import load_tensors, save_tensors
from usae.data.batches import aligned_batches

ENERGY_VARIANTS = ("eq9", "code")
BACKENDS = ("auto", "numpy", "torch")  # auto: numpy for CPU codes, torch (any device) otherwise
__all__ = ["FiringStats", "FiringAccumulator", "firing_stats", "encoded_batches", "decoder_atom_norms", "check_codes",
           "ENERGY_VARIANTS", "BACKENDS"]


@dataclass
class FiringStats:
    """Raw counts of one pass; every derived statistic is a property. ``M`` models, ``m`` concepts.

    fires: [M, m] int64, tokens with Z_k^(i) > threshold.   cofires: [m] int64, tokens firing in all models.
    activation_sum: [M, m] float64, sum of Z_k^(i) over tokens (all code values, no threshold).
    nonzero: [M, m] int64, tokens with Z_k^(i) > 0.          atom_norms: [M, m] float64, ||D_k^(i)|| (ones).
    """

    names: tuple[str, ...]
    threshold: float
    n_tokens: int
    fires: Tensor
    cofires: Tensor
    activation_sum: Tensor
    nonzero: Tensor
    atom_norms: Tensor

    @property
    def n_models(self) -> int:
        return len(self.names)

    @property
    def n_latents(self) -> int:
        return int(self.cofires.shape[0])

    @property
    def mean_activation(self) -> Tensor:
        """[M, m] E[Z_k^(i)] over all tokens (0 where a concept is not in the code)."""
        return self.activation_sum / max(self.n_tokens, 1)

    def energy_of(self, variant: str = "eq9") -> Tensor:
        """[M, m] per-model energy: ``"eq9"`` ||E[Z_k] D_k||^2 (paper), ``"code"`` ||E[Z_k] D_k|| (official)."""
        _check_variant(variant)
        norm = self.mean_activation * self.atom_norms
        return norm.square() if variant == "eq9" else norm

    @property
    def energy(self) -> Tensor:
        """[M, m] paper Eq. 9 energy ||E[Z_k^(i)] D_k^(i)||^2."""
        return self.energy_of("eq9")

    @property
    def energy_code(self) -> Tensor:
        """[M, m] the official code's unsquared energy ||E[Z_k^(i)] D_k^(i)||."""
        return self.energy_of("code")

    def aggregated_energy_of(self, variant: str = "eq9", reduce: str = "sum") -> Tensor:
        """[m] energy summed (paper, ordering) or averaged (``reduce="mean"``, Fig. 6c's y axis) over models."""
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce = {reduce!r} is not valid; expected 'sum' or 'mean'")
        e = self.energy_of(variant)
        return e.sum(0) if reduce == "sum" else e.mean(0)

    @property
    def aggregated_energy(self) -> Tensor:
        """[m] sum over models of the Eq. 9 energy; concepts are ordered by this."""
        return self.aggregated_energy_of("eq9", "sum")

    @property
    def never_fired(self) -> Tensor:
        """[m] bool: the concept exceeded the threshold in no model on no token."""
        return self.fires.sum(0) == 0

    def median_fires(self) -> Tensor:
        """[M] float: per model, the median fire count over the concepts that fire at least once (NaN if none)."""
        return torch.stack([row[row > 0].double().median() if bool((row > 0).any())
                            else torch.tensor(math.nan, dtype=torch.float64) for row in self.fires])

    def top_share(self, fraction: float = 0.01) -> Tensor:
        """[M] float: per model, the share of all fires taken by its ``fraction`` most-firing concepts (at least
        one concept); how concentrated firing is (``fraction`` alone when every concept fires equally often)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction = {fraction!r} is not valid; expected a number in (0, 1]")
        n = max(1, round(fraction * self.n_latents))
        top = self.fires.sort(dim=1, descending=True).values[:, :n].sum(1).double()
        return top / self.fires.sum(1).double().clamp_min(1)

    @property
    def fire_distribution(self) -> Tensor:
        """[M, m] p_k^(i) = |F_k^(i)| / sum_j |F_k^(j)|; NaN columns for never-fired concepts."""
        f = self.fires.double()
        return f / f.sum(0, keepdim=True)

    @property
    def entropy(self) -> Tensor:
        """[m] firing entropy normalised by log M, in [0, 1]; NaN for never-fired concepts (or M = 1)."""
        p = self.fire_distribution
        plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
        h = -plogp.sum(0) / math.log(self.n_models) if self.n_models > 1 else torch.full_like(p[0], math.nan)
        return torch.where(self.never_fired, torch.full_like(h, math.nan), h.clamp(0.0, 1.0))

    @property
    def entropy_code(self) -> Tensor:
        """[m] the official code's entropy: log2 with eps 1e-10; never-fired concepts get 0."""
        f = self.fires.double()
        p = f / (f.sum(0, keepdim=True) + 1e-10)
        return -(p * torch.log2(p + 1e-10)).sum(0) / math.log2(max(self.n_models, 2))

    @property
    def cofire_proportion(self) -> Tensor:
        """[M, m] |C_k| / |F_k^(i)| (Eq. 14); NaN where the concept never fires in model i."""
        return self.cofires.double().unsqueeze(0) / self.fires.double()

    @property
    def cofire_iou(self) -> Tensor:
        """[m] the official "cofire IoU" |C_k| / sum_i |F_k^(i)| (a sum, not a union); NaN if never fired."""
        return self.cofires.double() / self.fires.sum(0).double()

    @property
    def dead(self) -> Tensor:
        """[M, m] bool: never above the threshold in that model (the code's "dead after thresh")."""
        return self.fires == 0

    @property
    def dead_before_threshold(self) -> Tensor:
        """[M, m] bool: never a positive value in that model's code (the code's "total dead")."""
        return self.nonzero == 0

    def dead_fraction(self) -> dict[str, dict[str, float]]:
        """Per model: fraction of concepts dead ``before`` and ``after`` the threshold."""
        return {n: {"before": float(self.dead_before_threshold[i].double().mean()),
                    "after": float(self.dead[i].double().mean())} for i, n in enumerate(self.names)}

    # -- persistence: safetensors, names/threshold/n_tokens in its string metadata ------------------------------
    def save(self, path: str | Path) -> None:
        """Write atomically (temp file, then ``os.replace``)."""
        tensors = {f.name: getattr(self, f.name).contiguous() for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        save_tensors(path, tensors, {"names": json.dumps(list(self.names)), "threshold": repr(self.threshold),
                                     "n_tokens": str(self.n_tokens)})

    @classmethod
    def load(cls, path: str | Path) -> FiringStats:
        tensors, meta = load_tensors(path)
        return cls(tuple(json.loads(meta["names"])), float(meta["threshold"]), int(meta["n_tokens"]), **tensors)


def _check_variant(variant: str) -> None:
    if variant not in ENERGY_VARIANTS:
        raise ValueError(f"energy variant = {variant!r} is not valid; expected one of {list(ENERGY_VARIANTS)}")


def check_codes(codes: Mapping[str, Any], names: Sequence[str], n_latents: int) -> int:
    """Validate a dict of per-model SparseCodes of the same tokens; returns the number of tokens N."""
    if set(codes) != set(names):
        raise ValueError(f"codes have models {sorted(codes)}; expected exactly {sorted(names)}")
    n = None
    for name in names:
        c = codes[name]
        if c.values.shape != c.indices.shape or c.values.dim() != 2:
            raise ValueError(f"code of {name!r}: values {tuple(c.values.shape)} and indices "
                             f"{tuple(c.indices.shape)} must both be [N, k]")
        if int(c.n_latents) != n_latents:
            raise ValueError(f"code of {name!r} has n_latents = {c.n_latents}; expected {n_latents}")
        if n is not None and c.values.shape[0] != n:
            raise ValueError(f"code of {name!r} has {c.values.shape[0]} tokens; the others have {n}")
        n = int(c.values.shape[0])
    return int(n or 0)


def _float(values: Tensor) -> Tensor:
    return values if values.dtype in (torch.float32, torch.float64) else values.float()


def _counts_numpy(pairs: Sequence[tuple[Tensor, Tensor]], m: int, tau: float) -> tuple[Tensor, ...]:
    """CPU path. Co-fires: sort each token's M*k firing indices (sentinel m otherwise); as every model holds
    an index at most once, a run of M equal values is a concept firing in all models."""
    fires, nonzero, sums, masked = [], [], [], []
    for values, idx in pairs:
        v, i = values.cpu().numpy(), idx.cpu().numpy()
        firing = np.where(v > tau, i, m)
        fires.append(np.bincount(firing.ravel(), minlength=m + 1)[:m])
        nonzero.append(np.bincount(np.where(v > 0, i, m).ravel(), minlength=m + 1)[:m])
        sums.append(np.bincount(i.ravel(), weights=v.ravel(), minlength=m)[:m])
        masked.append(firing)
    if len(pairs) == 1:
        cof = fires[0]
    else:
        run = len(pairs) - 1
        srt = np.sort(np.concatenate(masked, axis=1), axis=1)
        head = srt[:, :-run]
        cof = np.bincount(head[(head == srt[:, run:]) & (head < m)], minlength=m)
    return tuple(torch.from_numpy(np.asarray(x)) for x in (np.stack(fires), np.stack(nonzero), np.stack(sums), cof))


def _counts_torch(pairs: Sequence[tuple[Tensor, Tensor]], m: int, tau: float) -> tuple[Tensor, ...]:
    """Any device. Co-fires: look each of model 0's firing indices up in every other model's sorted firing
    indices (batched ``searchsorted``; sentinel m marks "not firing")."""
    fires, nonzero, sums, others = [], [], [], []
    for values, idx in pairs:
        firing = torch.where(values > tau, idx, m)
        fires.append(torch.bincount(firing.reshape(-1), minlength=m + 1)[:m])
        nonzero.append(torch.bincount(torch.where(values > 0, idx, m).reshape(-1), minlength=m + 1)[:m])
        sums.append(torch.zeros(m, dtype=torch.float64, device=idx.device).index_add_(
            0, idx.reshape(-1), values.reshape(-1).double()))
        others.append(firing.sort(dim=1).values)
    idx0, cof = pairs[0][1], pairs[0][0] > tau
    for sorted_idx in others[1:]:
        pos = torch.searchsorted(sorted_idx, idx0).clamp_max(sorted_idx.shape[1] - 1)
        cof = cof & (sorted_idx.gather(1, pos) == idx0)
    return torch.stack(fires), torch.stack(nonzero), torch.stack(sums), torch.bincount(idx0[cof], minlength=m)


class FiringAccumulator:
    """Streaming counts over batches of the same tokens encoded by each model's own encoder.

    ``update({name: SparseCode [N, k]})`` costs O(N k M log(k M)) time and O(N k M) memory; state is O(M m).
    ``backend``: ``"numpy"`` (fastest on CPU), ``"torch"`` (any device; a different co-fire algorithm,
    which the tests check against the other), ``"auto"``.
    """

    def __init__(self, names: Sequence[str], n_latents: int, threshold: float = 0.1,
                 backend: str = "auto") -> None:
        if len(names) == 0 or len(set(names)) != len(names):
            raise ValueError(f"names = {list(names)!r}: expected one or more distinct model names")
        if n_latents <= 0:
            raise ValueError(f"n_latents = {n_latents}: expected a positive integer")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold = {threshold!r} is not valid; expected a number >= 0 (a concept fires on "
                             "a token when its code value exceeds it; the paper's tau is 0.1)")
        if backend not in BACKENDS:
            raise ValueError(f"backend = {backend!r} is not valid; expected one of {list(BACKENDS)}")
        self.names, self.n_latents, self.threshold = tuple(names), int(n_latents), float(threshold)
        self.backend = backend
        m, mm = len(self.names), self.n_latents
        self.n_tokens = 0
        self.fires = torch.zeros(m, mm, dtype=torch.int64)
        self.nonzero = torch.zeros(m, mm, dtype=torch.int64)
        self.activation_sum = torch.zeros(m, mm, dtype=torch.float64)
        self.cofires = torch.zeros(mm, dtype=torch.int64)

    def _to(self, device: torch.device) -> None:
        if self.fires.device != device:
            for attr in ("fires", "nonzero", "activation_sum", "cofires"):
                setattr(self, attr, getattr(self, attr).to(device))

    @torch.no_grad()
    def update(self, codes: Mapping[str, Any]) -> None:
        """Add one batch: ``codes[name]`` is model ``name``'s SparseCode of the same N tokens."""
        n = check_codes(codes, self.names, self.n_latents)
        if n == 0:
            return
        device = codes[self.names[0]].values.device
        self._to(torch.device("cpu") if self.backend == "numpy" else device)
        pairs = [(_float(codes[k].values), codes[k].indices.long()) for k in self.names]
        for k, (_, idx) in zip(self.names, pairs, strict=True):
            lo, hi = torch.aminmax(idx)
            if int(lo) < 0 or int(hi) >= self.n_latents:
                raise ValueError(f"code of {k!r} has indices in [{int(lo)}, {int(hi)}]; expected [0, {self.n_latents})")
        use_numpy = self.backend == "numpy" or (self.backend == "auto" and device.type == "cpu")
        fires, nonzero, sums, cofires = (_counts_numpy if use_numpy else _counts_torch)(
            pairs, self.n_latents, self.threshold)
        self.fires += fires.to(self.fires.device)
        self.nonzero += nonzero.to(self.fires.device)
        self.activation_sum += sums.to(self.fires.device)
        self.cofires += cofires.to(self.fires.device)
        self.n_tokens += n

    def result(self, atom_norms: Tensor | None = None) -> FiringStats:
        """The counts so far as a FiringStats on CPU; ``atom_norms`` [M, m] default to ones (unit atoms)."""
        shape = (len(self.names), self.n_latents)
        norms = torch.ones(shape, dtype=torch.float64) if atom_norms is None else atom_norms.double().cpu()
        if tuple(norms.shape) != shape:
            raise ValueError(f"atom_norms has shape {tuple(norms.shape)}; expected {shape}")
        return FiringStats(self.names, self.threshold, self.n_tokens, self.fires.cpu().clone(),
                           self.cofires.cpu().clone(), self.activation_sum.cpu().clone(),
                           self.nonzero.cpu().clone(), norms)


# -- encoding a dataset with each model's own encoder ------------------------------------------------------
def _batches(acts: Any, names: Sequence[str], split: str, batch_size: int) -> tuple[Iterable, int | None]:
    """(iterable of {name: [B, d_name]} row-aligned batches in order, number of batches if known)."""
    positive_int("batch_size", batch_size)
    if isinstance(acts, Mapping) or hasattr(acts, "batches"):
        rows = len(acts[names[0]]) if isinstance(acts, Mapping) and names[0] in acts else (
            acts.n_rows(split) if hasattr(acts, "n_rows") else None)
        total = None if rows is None else math.ceil(rows / batch_size)
        return aligned_batches(acts, names, batch_size, split=split, shuffle=False, drop_last=False), total
    return acts, (len(acts) if hasattr(acts, "__len__") else None)


def encoded_batches(model: Any, acts: Any, split: str = "val", batch_size: int = 8192,
                    progress: bool | None = None, desc: str = "encoding") -> Iterator[dict[str, Any]]:
    """Yield ``{name: SparseCode [B, k]}``: each model's aligned rows encoded by its own encoder.

    ``acts``: an ActivationStore (rows of ``split``, in order), a dict ``name -> [N, d]`` tensor, or an
    iterable of ``{name: [B, d]}`` batches. The model runs in eval mode without gradients and is put back
    in its previous mode afterwards. ``progress=None`` follows the source's own ``progress`` flag (a store
    from ``Experiment(progress=False)`` shows no bar), else shows a bar.
    """
    progress = getattr(acts, "progress", True) if progress is None else progress
    names = tuple(model.names)
    batches, total = _batches(acts, names, split, batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc=desc, disable=not progress):
                yield {n: model.encode(n, torch.as_tensor(batch[n]).to(device, torch.float32)) for n in names}
    finally:
        model.train(was_training)


def decoder_atom_norms(model: Any) -> Tensor | None:
    """[M, m] L2 norms of each model's decoder atoms, or None when the model exposes no decoder weights."""
    getter = getattr(model, "dictionary", None)  # UniversalSAE.dictionary(name): unit rows [m, d]
    if not callable(getter):
        return None
    with torch.no_grad():
        return torch.stack([getter(n).detach().double().norm(dim=-1).cpu() for n in model.names])


def firing_stats(model: Any, acts: Any, threshold: float = 0.1, batch_size: int = 8192, split: str = "val",
                 progress: bool | None = None) -> FiringStats:
    """One pass over ``acts`` (see :func:`encoded_batches`, also for ``progress``) -> FiringStats of ``model``'s
    concepts."""
    acc = FiringAccumulator(model.names, model.n_latents, threshold)
    for codes in encoded_batches(model, acts, split, batch_size, progress, desc="firing stats"):
        acc.update(codes)
    return acc.result(decoder_atom_norms(model))
