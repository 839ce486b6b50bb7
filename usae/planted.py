"""A planted shared dictionary: synthetic aligned rows with a known universal code, and how well a USAE finds it.

Every model ``i`` sees the same sparse code ``c`` (``active`` of ``n_atoms`` atoms per row, values uniform in
``[low, high]``) through its own unit-norm dictionary ``A_i`` [n_atoms, d_i], plus Gaussian noise:
``x_i = c A_i + noise``. A USAE that learns the shared space must (1) find every planted atom of every model
(matched cosine near 1) and (2) give each planted atom the **same latent index** in every model: that index
alignment is the whole point of a universal code.

``planted_problem`` draws the data; ``dictionary_recovery`` scores a trained model against the truth with a
Hungarian matching of planted atoms to latents per model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from usae.core.model import UniversalSAE

__all__ = ["PlantedProblem", "planted_problem", "DictionaryRecovery", "dictionary_recovery", "PlantedRun",
           "train_planted"]


@dataclass(frozen=True)
class PlantedProblem:
    """atoms: {name: [n_atoms, d] unit rows}; train/val: {name: [N, d]} aligned rows; code: [N_val, n_atoms]."""

    atoms: dict[str, Tensor]
    train: dict[str, Tensor]
    val: dict[str, Tensor]


def planted_problem(dims: Mapping[str, int] | None = None, n_atoms: int = 32, active: int = 3, n_rows: int = 40_000,
                    n_val: int = 4096, low: float = 0.5, high: float = 2.5, noise: float = 0.01,
                    seed: int = 0) -> PlantedProblem:
    """Draw a planted problem (default: two models of widths 16 and 24, 32 atoms, 3 active per row)."""
    dims = dict(dims or {"a": 16, "b": 24})
    if not 1 <= active <= n_atoms:
        raise ValueError(f"active = {active!r} is not valid; expected 1 <= active <= n_atoms={n_atoms}")
    if not 0 <= low <= high:
        raise ValueError(f"low, high = {low!r}, {high!r} are not valid; expected 0 <= low <= high")
    g = torch.Generator().manual_seed(seed)
    atoms = {name: F.normalize(torch.randn(n_atoms, d, generator=g), dim=1) for name, d in dims.items()}
    total = n_rows + n_val
    idx = torch.rand(total, n_atoms, generator=g).argsort(dim=1)[:, :active]
    values = low + (high - low) * torch.rand(total, active, generator=g)
    code = torch.zeros(total, n_atoms).scatter_(1, idx, values)
    rows = {name: code @ a + noise * torch.randn(total, a.shape[1], generator=g) for name, a in atoms.items()}
    return PlantedProblem(atoms, {n: x[:n_rows] for n, x in rows.items()}, {n: x[n_rows:] for n, x in rows.items()})


@dataclass(frozen=True)
class DictionaryRecovery:
    """matched_cosine: {name: [n_atoms]} cosine of each planted atom to its Hungarian-matched atom;
    latent: {name: [n_atoms]} the latent matched to each planted atom; aligned: share of planted atoms matched
    to the same latent in every model."""

    matched_cosine: dict[str, np.ndarray]
    latent: dict[str, np.ndarray]
    aligned: float

    def mean_cosine(self) -> dict[str, float]:
        return {n: float(c.mean()) for n, c in self.matched_cosine.items()}


def dictionary_recovery(model: UniversalSAE, atoms: Mapping[str, Tensor]) -> DictionaryRecovery:
    """Match each model's planted atoms [n_atoms, d] to the model's unit decoder rows [m, d] (maximal total
    cosine, ``scipy.optimize.linear_sum_assignment``) and check that the matched latents agree across models."""
    from scipy.optimize import linear_sum_assignment

    missing = [n for n in model.names if n not in atoms]
    if missing:
        raise ValueError(f"atoms is missing model(s) {missing}; expected one entry per model of {list(model.names)}")
    cosines, latents = {}, {}
    for name in model.names:
        truth = F.normalize(torch.as_tensor(atoms[name], dtype=torch.float32), dim=1)
        learned = model.dictionary(name, frozen=True).detach().float().cpu()
        if truth.shape[1] != learned.shape[1] or truth.shape[0] > learned.shape[0]:
            raise ValueError(f"atoms[{name!r}] has shape {tuple(truth.shape)}; expected [n <= {learned.shape[0]}, "
                             f"{learned.shape[1]}]")
        cos = (truth @ learned.T).numpy()
        rows, cols = linear_sum_assignment(-cos)
        cosines[name], latents[name] = cos[rows, cols], cols
    stacked = np.stack(list(latents.values()))
    aligned = float((stacked == stacked[0]).all(axis=0).mean())
    return DictionaryRecovery(cosines, latents, aligned)


@dataclass(frozen=True)
class PlantedRun:
    """One USAE trained on a planted problem: its recovery and validation R² [M, M]."""

    init: str
    recovery: DictionaryRecovery
    r2: Tensor

    def summary(self) -> dict[str, float | str]:
        off = self.r2[~torch.eye(len(self.r2), dtype=torch.bool)]
        return {"init": self.init, "mean matched cosine (worst model)": min(self.recovery.mean_cosine().values()),
                "same latent in every model": self.recovery.aligned, "self R² (worst)": float(self.r2.diagonal().min()),
                "cross R² (worst)": float(off.min())}


def train_planted(problem: PlantedProblem, init: str = "tied", *, n_latents: int = 64, k: int = 3,
                  steps: int = 1500, batch_size: int = 256, lr: float = 1e-2, update: str = "paper",
                  seed: int = 0) -> PlantedRun:
    """Train ``UniversalSAE(dims, n_latents, k, init=init)`` (default encoder and loss; ``update`` the trainer's
    rule) on ``problem.train`` and score it against the truth and on ``problem.val``."""
    from usae.config import TrainConfig
    from usae.stats.reconstruction import r2_matrix
    from usae.train.trainer import Trainer

    dims = {n: x.shape[1] for n, x in problem.train.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small run several times faster on one thread than on two
    try:
        torch.manual_seed(seed)
        model = UniversalSAE(dims, n_latents, k, init=init)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, update=update,
                          log_every=max(1, steps // 3))
        Trainer(model, cfg, progress=False).fit(problem.train)
        return PlantedRun(init, dictionary_recovery(model, problem.atoms), r2_matrix(model, problem.val))
    finally:
        torch.set_num_threads(threads)
