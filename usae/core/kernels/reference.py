"""Brute-force dense references of the sparse primitives (tests only: they build [N, m] or loop in Python)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["dense_code", "gather_sum", "sampled_dots", "segment_rows", "encoder_pre"]


def dense_code(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """[N, n_latents] with values summed at their indices (repeats add)."""
    return values.new_zeros(values.shape[0], n_latents).scatter_add(1, indices, values)


def gather_sum(values: Tensor, indices: Tensor, tables: Sequence[Tensor]) -> list[Tensor]:
    """Decode as a dense matmul: dense_code @ table for every table."""
    return [dense_code(values.to(t.dtype), indices, t.shape[0]) @ t for t in tables]


def sampled_dots(indices: Tensor, grads: Sequence[Tensor], tables: Sequence[Tensor]) -> Tensor:
    """out[n, s] = Σ_j (grads_j @ tables_jᵀ)[n, indices[n, s]], from the full dense product."""
    return sum((g @ t.t()).gather(1, indices) for g, t in zip(grads, tables, strict=True))


def segment_rows(offsets: Tensor, rows: Tensor, weights: Tensor | None, table: Tensor) -> Tensor:
    """A Python loop over segments and entries."""
    out = table.new_zeros(offsets.shape[0] - 1, table.shape[1])
    for seg in range(offsets.shape[0] - 1):
        for e in range(int(offsets[seg]), int(offsets[seg + 1])):
            out[seg] += table[rows[e]] * (1.0 if weights is None else weights[e])
    return out


def encoder_pre(linear: nn.Linear, bn: nn.BatchNorm1d | None, x: Tensor) -> Tensor:
    """The autograd encoder: bn(linear(x)) (or linear(x))."""
    h = linear(x)
    return bn(h) if bn is not None else h
