"""Streaming statistics of a trained USAE.

Reconstruction (cross-model R² matrix, self-reconstruction MSE/R²) lives in ``usae.reconstruction`` and is
re-exported here; concept statistics (fires, co-fires, entropy, energy, matching) are added in this module.
"""

from __future__ import annotations

from usae.reconstruction import (
    R2_BASELINES,
    R2Accumulator,
    aligned_batches,
    r2_matrix,
    reconstruction_stats,
    self_reconstruction,
)

__all__ = ["R2_BASELINES", "R2Accumulator", "aligned_batches", "r2_matrix", "reconstruction_stats",
           "self_reconstruction"]
