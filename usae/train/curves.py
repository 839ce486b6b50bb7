"""Curves derived from a training history (``Trainer.fit``'s ``TrainHistory``) for the book's figures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from usae.config import TrainConfig
from usae.train.history import TrainHistory
from usae.train.trainer import learning_rate


def smooth(values: np.ndarray | list[float], window: int) -> np.ndarray:
    """Trailing moving average ``[T] -> [T]`` (the first points average what exists so far)."""
    x = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_per_model(history: TrainHistory, window: int = 25) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (steps, smoothed total loss)`` over the steps where that model was the selected encoder."""
    steps = np.asarray(history.step)
    chosen = np.asarray(history.model)
    loss = np.asarray(history.loss, dtype=np.float64)
    return {name: (steps[chosen == i], smooth(loss[chosen == i], window)) for i, name in enumerate(history.names)}


def logged_r2(history: TrainHistory) -> dict[str, np.ndarray]:
    """From the logged running R² matrices: ``step``, ``self`` (mean diagonal) and ``cross`` (mean off-diagonal)."""
    log = history.log
    mats = np.asarray([entry.r2 for entry in log], dtype=np.float64)  # [L, M, M]
    m = mats.shape[-1]
    diag = np.einsum("lii->li", mats).mean(axis=1)
    off = (mats.sum(axis=(1, 2)) - np.einsum("lii->l", mats)) / max(m * (m - 1), 1)
    return {"step": np.asarray([entry.step for entry in log]), "self": diag, "cross": off if m > 1 else diag}


def dead_fractions(history: TrainHistory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (logged steps, fraction of latents dead for that model's encoder)``."""
    steps = np.asarray([entry.step for entry in history.log])
    return {n: (steps, np.asarray([entry.dead_fraction[n] for entry in history.log])) for n in history.names}


@dataclass(frozen=True)
class Schedules:
    """Learning rate at the steps ``step`` [T] of a history: ``shared`` (ours: one schedule driven by the global
    step) and ``per_model`` (name -> [T], the official per-model stepping: a model's scheduler advances only when
    it is picked, so its cosine never finishes)."""

    step: np.ndarray
    shared: np.ndarray
    per_model: dict[str, np.ndarray]


def schedules(cfg: TrainConfig, history: TrainHistory) -> Schedules:
    """Both learning-rate schedules at the kept steps of a run (``history.picks``: each model's pick count
    before the step; histories of earlier versions keep every step, whose ``model`` series gives the counts)."""
    steps = np.asarray(history.step, dtype=np.int64)
    if history.picks:
        counts = np.asarray(history.picks, dtype=np.int64).reshape(len(steps), len(history.names))
    elif history.complete:
        chosen = np.asarray(history.model, dtype=np.int64)
        onehot = chosen[:, None] == np.arange(len(history.names))[None, :]
        counts = np.cumsum(onehot, axis=0) - onehot
    else:
        raise ValueError("schedules: this thinned history has no pick counts; it cannot give the per-model schedule")
    shared = np.array([learning_rate(cfg, int(t)) for t in steps])
    per_model = {n: np.array([learning_rate(cfg, int(c)) for c in counts[:, i]]) for i, n in enumerate(history.names)}
    return Schedules(steps, shared, per_model)
