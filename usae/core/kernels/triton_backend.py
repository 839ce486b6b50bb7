"""Triton kernels (CUDA) for the three sparse primitives of a USAE step, and the ``"triton"`` decode backend.

- ``gather_sum``:   out[n, :] = Σ_s values[n, s] · table[indices[n, s], :]          (decode; fp32 accumulation)
- ``sampled_dots``: out[n, s] = Σ_c grad[n, c] · table[indices[n, s], c]           (gradient of the values)
- ``segment_rows``: out[l, :] = Σ_{e in offsets[l]:offsets[l+1]} w[e] · table[rows[e], :]   (weight gradients)

Each program of ``segment_rows`` reduces one latent's segment of the ``LatentGroups`` (entries sorted by
latent, built once per step) in a fixed order: deterministic, no atomics, empty segments write zeros.
Several dictionaries are handled by one launch per dictionary over the same indices and plan; the value
gradient accumulates over dictionaries in launch order (deterministic too).

Importing this module imports triton; ``usae.core.sparse`` does so only on first use on CUDA. For tests on CPU set
``TRITON_INTERPRET=1`` before importing it (the kernels are defined at import time).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from usae.core.kernels.groups import LatentGroups, group_by_latent

__all__ = ["TritonBackend", "gather_sum", "sampled_dots", "segment_rows"]

BLOCK_N, BLOCK_K, BLOCK_D, BLOCK_E = 16, 4, 64, 32


@triton.jit
def _gather_sum_kernel(values_ptr, indices_ptr, table_ptr, out_ptr, n_rows, width, k, stride_table, stride_out,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < width
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        slots = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (slots < k)[None, :]
        idx = tl.load(indices_ptr + rows[:, None] * k + slots[None, :], mask=ok, other=0)
        val = tl.load(values_ptr + rows[:, None] * k + slots[None, :], mask=ok, other=0.0).to(tl.float32)
        rows_w = tl.load(table_ptr + idx[:, :, None] * stride_table + cols[None, None, :],
                         mask=ok[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(val[:, :, None] * rows_w, axis=1)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sampled_dots_kernel(grad_ptr, indices_ptr, table_ptr, out_ptr, n_rows, width, k, stride_grad, stride_table,
                         ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows < n_rows)[:, None] & (slots < k)[None, :]
    idx = tl.load(indices_ptr + rows[:, None] * k + slots[None, :], mask=ok, other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, width, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < width
        g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols[None, :],
                    mask=(rows < n_rows)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        rows_w = tl.load(table_ptr + idx[:, :, None] * stride_table + cols[None, None, :],
                         mask=ok[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(rows_w * g[:, None, :], axis=2)
    out = out_ptr + rows[:, None] * k + slots[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=ok, other=0.0)
    tl.store(out, acc, mask=ok)


@triton.jit
def _segment_rows_kernel(offsets_ptr, rows_ptr, weights_ptr, table_ptr, out_ptr, width, stride_table, stride_out,
                         HAS_WEIGHTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    segment = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < width
    start = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        entries = e0 + tl.arange(0, BLOCK_E)
        ok = entries < end
        rows = tl.load(rows_ptr + entries, mask=ok, other=0)
        part = tl.load(table_ptr + rows[:, None] * stride_table + cols[None, :],
                       mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + entries, mask=ok, other=0.0).to(tl.float32)
            part = part * w[:, None]
        acc += part
    tl.store(out_ptr + segment * stride_out + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)


def gather_sum(values: Tensor, indices: Tensor, tables: Sequence[Tensor]) -> list[Tensor]:
    """values [N, K], indices [N, K] -> one [N, d_j] per table [m, d_j] (accumulated in float32)."""
    values, indices = values.contiguous(), indices.contiguous()
    n, k = indices.shape
    outs = []
    for table in tables:
        table = table.contiguous()
        out = table.new_empty(n, table.shape[1])
        if n and table.shape[1]:
            grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(table.shape[1], BLOCK_D))
            _gather_sum_kernel[grid](values, indices, table, out, n, table.shape[1], k, table.stride(0),
                                     out.stride(0), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
        outs.append(out)
    return outs


def sampled_dots(indices: Tensor, grads: Sequence[Tensor], tables: Sequence[Tensor]) -> Tensor:
    """indices [N, K], grads [N, d_j], tables [m, d_j] -> [N, K] float32: Σ_j <grads_j[n], tables_j[idx[n, s]]>."""
    indices = indices.contiguous()
    n, k = indices.shape
    out = torch.zeros(n, k, dtype=torch.float32, device=indices.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
    for j, (grad, table) in enumerate(zip(grads, tables, strict=True)):
        grad, table = grad.contiguous(), table.contiguous()
        if n and table.shape[1]:
            _sampled_dots_kernel[grid](grad, indices, table, out, n, table.shape[1], k, grad.stride(0),
                                       table.stride(0), ACCUMULATE=j > 0, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                       BLOCK_D=BLOCK_D)
    return out


def segment_rows(offsets: Tensor, rows: Tensor, weights: Tensor | None, table: Tensor) -> Tensor:
    """offsets [L + 1], rows [E], weights [E] or None, table [R, d] -> [L, d] segmented weighted row sums."""
    table, rows = table.contiguous(), rows.contiguous()
    n_segments, width = offsets.shape[0] - 1, table.shape[1]
    out = table.new_empty(n_segments, width)
    if n_segments and width:
        w = weights.contiguous() if weights is not None else rows  # unused pointer when HAS_WEIGHTS is False
        grid = (n_segments, triton.cdiv(width, BLOCK_D))
        _segment_rows_kernel[grid](offsets.contiguous(), rows, w, table, out, width, table.stride(0),
                                   out.stride(0), HAS_WEIGHTS=weights is not None, BLOCK_E=BLOCK_E,
                                   BLOCK_D=BLOCK_D)
    return out


@dataclass(frozen=True)
class _TritonPlan:
    indices: Tensor
    groups: LatentGroups


class TritonBackend:
    """The ``"triton"`` decode backend: the kernels above over one ``LatentGroups`` plan per code."""

    shares_groups = True

    def forward(self, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        return gather_sum(values, indices, [weight])[0]

    def plan(self, indices: Tensor, n_latents: int, groups: LatentGroups | None = None) -> _TritonPlan:
        return _TritonPlan(indices.contiguous(), groups if groups is not None else group_by_latent(indices, n_latents))

    def grad_values(self, plan: _TritonPlan, grad_out: Tensor, weight: Tensor) -> Tensor:
        return sampled_dots(plan.indices, [grad_out], [weight])

    def grad_weight(self, plan: _TritonPlan, values: Tensor, grad_out: Tensor) -> Tensor:
        return self.grad_weights_many(plan, values, [grad_out])[0]

    def forward_many(self, values: Tensor, indices: Tensor, weights: Sequence[Tensor]) -> list[Tensor]:
        return gather_sum(values, indices, weights)

    def grad_values_many(self, plan: _TritonPlan, grads: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
        return sampled_dots(plan.indices, grads, weights)

    def grad_weights_many(self, plan: _TritonPlan, values: Tensor, grads: Sequence[Tensor]) -> list[Tensor]:
        grouped = plan.groups.gather(values)
        return [segment_rows(plan.groups.offsets, plan.groups.tokens, grouped, g) for g in grads]
