"""Grouping the entries of a sparse code by latent: the index work every backward pass shares.

A code of N tokens with K entries each has E = N·K entries ``(token n, slot s, latent indices[n, s])``.
The gradient of a decoder (``Zᵀ · grad_out``) and the sparse part of the encoder's weight gradient
(``Gᵀ · X``) are both *segmented* sums: for every latent j, a weighted sum of the rows of a per-token table
over the entries that use j. ``group_by_latent`` sorts the entries by latent once (a stable sort, so each
segment lists its entries in increasing token order); every such sum then reads contiguous segments and
reduces them in a fixed order, which makes it deterministic without atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LatentGroups", "group_by_latent"]


@dataclass(frozen=True)
class LatentGroups:
    """Entries of an [N, K] index tensor grouped by latent.

    order: [E] flat entry positions (``n * K + s``) sorted by latent, ties in increasing position;
    tokens: [E] token of each grouped entry (``order // K``);
    offsets: [m + 1] segment bounds: latent j owns grouped entries ``offsets[j]:offsets[j + 1]``
    (empty for latents no token uses).
    """

    order: Tensor
    tokens: Tensor
    offsets: Tensor
    n_latents: int
    n_tokens: int
    k: int

    def gather(self, per_entry: Tensor) -> Tensor:
        """Per-entry values [N, K] -> the same values in grouped order [E]."""
        return per_entry.reshape(-1)[self.order]


def group_by_latent(indices: Tensor, n_latents: int) -> LatentGroups:
    """indices [N, K] int64 in ``[0, n_latents)`` -> their ``LatentGroups`` (one sort, one bincount)."""
    if indices.dim() != 2 or indices.dtype != torch.int64:
        raise ValueError(f"group_by_latent: indices must be int64 [N, K], got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    n, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=offsets[1:])
    return LatentGroups(order, torch.div(order, k, rounding_mode="floor"), offsets, n_latents, n, k)
