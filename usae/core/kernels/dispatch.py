"""Pick the implementation of a sparse primitive for a device: Triton on CUDA when importable, else torch.

``triton_module`` is the only place that imports Triton; ``usae.core.sparse`` registers its decode backend
through it too."""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

from torch import Tensor

from usae.core.kernels import torch_ops  # a submodule import: this package's __init__ imports nothing
from usae.core.kernels.groups import LatentGroups

__all__ = ["triton_module", "segment_rows", "segment_rows_grouped"]


@lru_cache(maxsize=1)
def triton_module() -> ModuleType | None:
    """``usae.core.kernels.triton_backend`` (imported on first call), or None when triton cannot be imported."""
    try:
        from usae.core.kernels import triton_backend
    except ImportError:
        return None
    return triton_backend


def segment_rows(offsets: Tensor, rows: Tensor, weights: Tensor | None, table: Tensor) -> Tensor:
    """Segmented weighted row sums [L, d] (see ``torch_ops.segment_rows``) on the best kernel for the device."""
    if table.device.type == "cuda" and triton_module() is not None:
        return triton_module().segment_rows(offsets, rows, weights, table)
    return torch_ops.segment_rows(offsets, rows, weights, table)


def segment_rows_grouped(groups: LatentGroups, weights: Tensor, table: Tensor) -> Tensor:
    """``segment_rows`` over ``LatentGroups``: weights [E] in grouped order, table [N, d] -> [m, d]."""
    return segment_rows(groups.offsets, groups.tokens, weights, table)
