"""Reconstruction quality of a USAE: the cross-model R² matrix (Fig. 5) and self-reconstruction (Table 1).

Entry (i, j) scores activations of model j reconstructed from the code of encoder i (row = encoder,
column = decoder, ``model.names`` order). Everything streams over batches with running sums, so any number
of tokens fits in memory.

R² baselines (``baseline=``):

- ``"global"`` (default, the official code's baseline): 1 - SSE / SST with SST taken around the **global
  scalar mean** of the target over the whole set. We accumulate SSE and SST over all batches and divide
  once, rather than averaging per-batch R² as the official code does; the two agree up to batch-to-batch
  variation of the mean and variance.
- ``"feature"``: SST around the per-feature (per-channel) mean, the stricter textbook R².
- ``"batch_mean"``: the official code exactly, mean over batches of 1 - mse / (var_global + 1e-6).

MSE is the mean over all elements (on standardised activations, as Table 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from usae._checks import positive_int
from usae.core.model import UniversalSAE
from usae.data.batches import aligned_batches

__all__ = ["R2_BASELINES", "R2Accumulator", "reconstruction_stats", "r2_matrix",
           "self_reconstruction"]

R2_BASELINES = ("global", "feature", "batch_mean")


class R2Accumulator:
    """Running sums for the M×M reconstruction scores (float64, on the device of the first update)."""

    def __init__(self, names: Sequence[str], dims: Mapping[str, int]) -> None:
        self.names = tuple(names)
        self.dims = {n: int(dims[n]) for n in self.names}
        self.reset()

    def reset(self) -> None:
        m, f64 = len(self.names), torch.float64
        self.sse = torch.zeros(m, m, dtype=f64)          # sum of squared errors
        self.rows = torch.zeros(m, m, dtype=f64)         # tokens seen
        self.sumsq = torch.zeros(m, m, dtype=f64)        # sum of target²
        self.sums = [torch.zeros(m, self.dims[n], dtype=f64) for n in self.names]  # [j]: [i, d_j] target sums
        self.batch_r2 = torch.zeros(m, m, dtype=f64)     # sum of per-batch official R²
        self.batches = torch.zeros(m, m, dtype=f64)

    def _tensors(self) -> dict[str, Tensor]:
        out = {"sse": self.sse, "rows": self.rows, "sumsq": self.sumsq, "batch_r2": self.batch_r2,
               "batches": self.batches}
        out.update({f"sums.{j}": s for j, s in enumerate(self.sums)})
        return out

    def state(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self._tensors().items()}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        for key, ref in self._tensors().items():
            if key not in state or state[key].shape != ref.shape:
                raise ValueError(f"R2Accumulator state: {key!r} missing or of the wrong shape")
        self.sse, self.rows, self.sumsq = (state[k].to(torch.float64) for k in ("sse", "rows", "sumsq"))
        self.batch_r2, self.batches = state["batch_r2"].to(torch.float64), state["batches"].to(torch.float64)
        self.sums = [state[f"sums.{j}"].to(torch.float64) for j in range(len(self.names))]

    @torch.no_grad()
    def update(self, i: int, j: int, target: Tensor, estimate: Tensor) -> None:
        """Add one batch of target [N, d_j] and its estimate from encoder i."""
        if self.sse.device != target.device:
            for key, t in self._tensors().items():
                if not key.startswith("sums."):
                    setattr(self, key, t.to(target.device))
            self.sums = [s.to(target.device) for s in self.sums]
        target, estimate = target.float(), estimate.float()
        n, d = target.shape
        sse = torch.linalg.vector_norm(target - estimate).double().square()
        col_sums = target.sum(0).double()
        sumsq = torch.linalg.vector_norm(target).double().square()
        self.sse[i, j] += sse
        self.rows[i, j] += n
        self.sumsq[i, j] += sumsq
        self.sums[j][i] += col_sums
        var = sumsq / (n * d) - (col_sums.sum() / (n * d)) ** 2
        self.batch_r2[i, j] += 1 - (sse / (n * d)) / (var + 1e-6)
        self.batches[i, j] += 1

    def mse(self) -> Tensor:
        """[M, M] mean squared error per element (NaN where never updated)."""
        widths = torch.tensor([self.dims[n] for n in self.names], dtype=torch.float64, device=self.sse.device)
        return (self.sse / (self.rows * widths)).cpu()

    def matrix(self, baseline: str = "global") -> Tensor:
        """[M, M] R² (row = encoder, column = decoder); NaN where never updated."""
        if baseline == "batch_mean":
            return (self.batch_r2 / self.batches).cpu()
        widths = torch.tensor([self.dims[n] for n in self.names], dtype=torch.float64, device=self.sse.device)
        if baseline == "global":
            total = torch.stack([s.sum(1) for s in self.sums], dim=1)           # [i, j]
            sst = self.sumsq - total.square() / (self.rows * widths)
        elif baseline == "feature":
            sq_of_sums = torch.stack([s.square().sum(1) for s in self.sums], dim=1)
            sst = self.sumsq - sq_of_sums / self.rows
        else:
            raise ValueError(f"baseline = {baseline!r} is not valid; expected one of {list(R2_BASELINES)}")
        return (1 - self.sse / sst).cpu()


@torch.no_grad()
def reconstruction_stats(model: UniversalSAE, acts: Any, batch_size: int = 4096, *, split: str = "val",
                         diagonal_only: bool = False, backend: str = "auto", progress: bool = False) -> R2Accumulator:
    """One streaming pass in eval mode (BN running statistics): every encoder into every decoder."""
    positive_int("batch_size", batch_size)
    acc = R2Accumulator(model.names, model.dims)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        batches = aligned_batches(acts, model.names, batch_size, split=split)
        for raw in tqdm(batches, desc="reconstruction", disable=not progress, leave=False):
            batch = {n: x.to(device) for n, x in model.check_batch(raw).items()}
            for i, name in enumerate(model.names):
                code = model.encode(name, batch[name])
                targets = (name,) if diagonal_only else model.names
                for tname, est in model.decode(code, targets, backend=backend).items():
                    acc.update(i, model.index(tname), batch[tname], est)
    finally:
        model.train(was_training)
    if not acc.rows.any():
        raise ValueError(f"acts gave no rows (split={split!r}); nothing to score")
    return acc


def r2_matrix(model: UniversalSAE, acts: Any, batch_size: int = 4096, *, split: str = "val",
              baseline: str = "global", backend: str = "auto", progress: bool = False) -> Tensor:
    """Cross-model R² [M, M] (row i = encoder i, column j = decoder j, ``model.names`` order), eval mode."""
    if baseline not in R2_BASELINES:
        raise ValueError(f"baseline = {baseline!r} is not valid; expected one of {list(R2_BASELINES)}")
    stats = reconstruction_stats(model, acts, batch_size, split=split, backend=backend, progress=progress)
    return stats.matrix(baseline)


def self_reconstruction(model: UniversalSAE, acts: Any, batch_size: int = 4096, *, split: str = "val",
                        backend: str = "auto", progress: bool = False) -> dict[str, dict[str, float]]:
    """Table 1: per model {"mse", "r2" (global mean), "r2_feature", "r2_batch_mean"} of self-reconstruction."""
    stats = reconstruction_stats(model, acts, batch_size, split=split, diagonal_only=True, backend=backend,
                                 progress=progress)
    mse, r2, r2f, r2b = stats.mse(), stats.matrix("global"), stats.matrix("feature"), stats.matrix("batch_mean")
    return {n: {"mse": float(mse[i, i]), "r2": float(r2[i, i]), "r2_feature": float(r2f[i, i]),
                "r2_batch_mean": float(r2b[i, i])} for i, n in enumerate(model.names)}
