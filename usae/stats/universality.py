"""Universality summaries of a :class:`~usae.stats.firing.FiringStats` (paper Fig. 6).

- :func:`entropy_histogram` (Fig. 6a): how evenly concepts fire across models.
- :func:`cfp_curves`, :func:`cfp_mean_curve` (Fig. 6b): co-fire proportion of the most energetic concepts.
- :func:`energy_cofire_fit` (Fig. 6c): log-log least-squares fit of aggregated energy vs co-fire count.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from usae._checks import positive_int
from usae.stats.concepts import concept_order
from usae.stats.firing import FiringStats

__all__ = ["LogLogFit", "loglog_fit", "energy_cofire_fit", "cfp_curves", "cfp_mean_curve", "entropy_histogram"]


def entropy_histogram(stats: FiringStats, n_bins: int = 30) -> tuple[Tensor, Tensor, int]:
    """Fig. 6a: (counts [n_bins], bin edges [n_bins + 1] over [0, 1], number of never-fired concepts).

    Only concepts that fire somewhere are binned (1.0 falls in the last bin); never-fired concepts have no
    entropy and are counted apart (the official code puts them in the first bin at 0).
    """
    positive_int("n_bins", n_bins)
    if stats.n_models < 2:
        raise ValueError(f"firing entropy needs >= 2 models; got {stats.n_models} ({list(stats.names)})")
    h = stats.entropy
    fired = h[~stats.never_fired].double().numpy()
    counts, edges = np.histogram(fired, bins=n_bins, range=(0.0, 1.0))
    return torch.from_numpy(counts), torch.from_numpy(edges), int(stats.never_fired.sum())


def cfp_curves(stats: FiringStats, top: int = 1000, variant: str = "eq9") -> tuple[Tensor, Tensor]:
    """Fig. 6b: for the ``top`` concepts by energy, each model's CFP sorted descending [M, top] and its mean [M].

    Concepts that never fire in a model count as CFP 0 there.
    """
    chosen = concept_order(stats, variant)[:top]
    cfp = stats.cofire_proportion[:, chosen].nan_to_num(0.0)
    return cfp.sort(dim=1, descending=True).values, cfp.mean(1)


def cfp_mean_curve(stats: FiringStats, top: int = 1000, variant: str = "eq9") -> Tensor:
    """Fig. 6b's mean curve: for the ``top`` concepts by energy, the CFP averaged over models, sorted [top]."""
    chosen = concept_order(stats, variant)[:top]
    return stats.cofire_proportion[:, chosen].nan_to_num(0.0).mean(0).sort(descending=True).values


# -- universality vs importance (Fig. 6c) ---------------------------------------------------------------------
class LogLogFit(NamedTuple):
    """Least-squares line log10(y) = slope log10(x) + intercept, Pearson r of the logs, points used."""

    slope: float
    intercept: float
    pearson_r: float
    n_concepts: int


def loglog_fit(x: Tensor, y: Tensor) -> LogLogFit:
    """Fit over the entries of ``x``, ``y`` [n] with both > 0 (and finite); NaN with fewer than 2 points."""
    keep = (x > 0) & (y > 0) & torch.isfinite(x.double()) & torch.isfinite(y.double())
    lx, ly = torch.log10(x[keep].double()), torch.log10(y[keep].double())
    n = int(keep.sum())
    if n < 2 or float(lx.var()) == 0.0:
        return LogLogFit(math.nan, math.nan, math.nan, n)
    dx, dy = lx - lx.mean(), ly - ly.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    r = float((dx * dy).sum() / ((dx * dx).sum() * (dy * dy).sum()).sqrt())
    return LogLogFit(slope, float(ly.mean() - slope * lx.mean()), r, n)


def energy_cofire_fit(stats: FiringStats, min_cofires: int = 1, variant: str = "code",
                      reduce: str = "mean") -> LogLogFit:
    """Fig. 6c: co-fire count (x) vs aggregated energy (y), log-log, concepts with >= ``min_cofires``.

    The defaults reproduce how the figure was made (official code: unsquared energy, mean over models;
    ``reduce`` only moves the intercept). Paper: r = 0.63, slope 0.23 (all); r = 0.89, slope 0.70 (>= 1000).
    """
    keep = stats.cofires >= min_cofires
    return loglog_fit(stats.cofires[keep].double(), stats.aggregated_energy_of(variant, reduce)[keep])
