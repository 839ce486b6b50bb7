"""Sparse codes and the two operations on them: TopK encoding and sparse decoding.

A code of N tokens over m latents with k active latents per token is kept as ``values: [N, k]`` and
``indices: [N, k]``; it is never densified outside tests. Decoding gathers the k decoder rows each token
uses, so it costs O(N·k·d) instead of the O(N·m·d) of a dense matmul, and so does its backward:

- ``grad_values[n, j] = <grad_out[n], weight[indices[n, j]]>``  (a sampled dense-dense product),
- ``grad_weight = Zᵀ · grad_out``, Z the sparse code, touching only the rows that were used.

The index work of the backward (the transpose of the code's sparsity pattern) depends only on the indices,
so it is computed once per code and shared by every decoder the code is decoded into.

Backends
--------
``sparse_decode`` dispatches to a named backend (``register_backend``). ``"torch"`` uses
``F.embedding_bag``, ``torch.sparse.sampled_addmm`` and a CSR matmul and runs on any device; Triton kernels
can register under another name and be picked by ``backend="auto"``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "SparseCode",
    "DecodeBackend",
    "topk_encode",
    "sparse_decode",
    "dense_decode_reference",
    "register_backend",
    "available_backends",
]


@dataclass
class SparseCode:
    """A sparse code: token ``n`` has value ``values[n, j]`` on latent ``indices[n, j]``.

    values: [N, k] float; indices: [N, k] int64 in ``[0, n_latents)``. A repeated index within a row
    counts twice (decoding sums). Codes from ``topk_encode`` have distinct indices per row.
    """

    values: Tensor
    indices: Tensor
    n_latents: int
    _plans: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.values.dim() != 2 or self.indices.shape != self.values.shape:
            raise ValueError(
                f"SparseCode: values {tuple(self.values.shape)} and indices {tuple(self.indices.shape)} "
                "must both be [N, k]")
        if self.indices.dtype != torch.int64:
            raise ValueError(f"SparseCode: indices dtype {self.indices.dtype} is not valid; expected torch.int64")
        if not self.values.is_floating_point():
            raise ValueError(f"SparseCode: values dtype {self.values.dtype} is not valid; expected a float dtype")
        if not isinstance(self.n_latents, int) or self.n_latents < max(1, self.values.shape[1]):
            raise ValueError(f"SparseCode: n_latents = {self.n_latents!r} is not valid; expected an int >= k="
                             f"{self.values.shape[1]}")

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def __len__(self) -> int:
        return self.values.shape[0]

    def detach(self) -> "SparseCode":
        return SparseCode(self.values.detach(), self.indices, self.n_latents, self._plans)

    def to(self, device: torch.device | str) -> "SparseCode":
        return SparseCode(self.values.to(device), self.indices.to(device), self.n_latents)

    def to_dense(self) -> Tensor:
        """The dense code ``[N, n_latents]`` (tests and tiny examples only)."""
        dense = self.values.new_zeros(len(self), self.n_latents)
        return dense.scatter_add(1, self.indices, self.values)


def topk_encode(pre: Tensor, k: int) -> SparseCode:
    """TopK of ReLU(pre) per row: pre [N, m] -> SparseCode with k entries per token.

    Equal to the official ``scatter(topk(relu(pre)))`` (ReLU is monotonic, so ``relu(topk(pre))`` selects the
    same values; ties among non-positive entries only ever carry a value of 0). Gradients flow to the k
    selected pre-activations that are positive.
    """
    if pre.dim() != 2:
        raise ValueError(f"topk_encode: pre must be [N, m], got shape {tuple(pre.shape)}")
    if not 1 <= k <= pre.shape[1]:
        raise ValueError(f"topk_encode: k = {k} is not valid; expected 1 <= k <= m={pre.shape[1]}")
    top = pre.topk(k, dim=1, sorted=False)
    return SparseCode(F.relu(top.values), top.indices, pre.shape[1])


# ----------------------------------------------------------------------------------------------------------
class DecodeBackend(Protocol):
    """What a decode backend provides (all tensors on one device; ``plan`` is backend-private)."""

    def forward(self, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        """values [N, k], indices [N, k], weight [m, d] -> out [N, d] = sum_j values[:, j] weight[indices[:, j]]."""

    def plan(self, indices: Tensor, n_latents: int) -> Any:
        """Index work shared by every decoder of one code (built once, on the first backward)."""

    def grad_values(self, plan: Any, grad_out: Tensor, weight: Tensor) -> Tensor:
        """grad_out [N, d], weight [m, d] -> [N, k]."""

    def grad_weight(self, plan: Any, values: Tensor, grad_out: Tensor) -> Tensor:
        """values [N, k], grad_out [N, d] -> [m, d] (zero rows for unused latents)."""


@dataclass
class _TorchPlan:
    pattern: Tensor        # CSR [N, m], columns sorted within each row, for sampled_addmm
    row_order: Tensor      # [N, k]: position in the row-sorted pattern -> position in the code row
    t_crow: Tensor         # [m + 1] CSR row pointers of the transposed code Zᵀ [m, N]
    t_col: Tensor          # [N·k] token of each entry of Zᵀ
    t_perm: Tensor         # [N·k] flat code position of each entry of Zᵀ
    n_latents: int


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class TorchBackend:
    """Portable backend: embedding_bag forward, sampled_addmm + CSR matmul backward (no N×k×d buffer)."""

    def forward(self, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")

    def plan(self, indices: Tensor, n_latents: int) -> _TorchPlan:
        n, k = indices.shape
        device = indices.device
        sorted_cols, row_order = indices.sort(dim=1)
        row_ptr = torch.arange(0, n * k + 1, k, device=device)
        pattern = _csr(row_ptr, sorted_cols.reshape(-1), torch.ones(n * k, device=device), (n, n_latents))
        flat = indices.reshape(-1)
        # unique keys (latent major, then code position) make an unstable sort deterministic
        t_perm = torch.sort(flat * (n * k) + torch.arange(n * k, device=device)).indices
        t_crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=device)
        t_crow[1:] = torch.bincount(flat, minlength=n_latents).cumsum(0)
        return _TorchPlan(pattern, row_order, t_crow, t_perm // k, t_perm, n_latents)

    def grad_values(self, plan: _TorchPlan, grad_out: Tensor, weight: Tensor) -> Tensor:
        pattern = plan.pattern.to(grad_out.dtype)
        sampled = torch.sparse.sampled_addmm(pattern, grad_out.contiguous(), weight.t(), beta=0.0)
        in_sorted_order = sampled.values().reshape(plan.row_order.shape)
        return torch.empty_like(in_sorted_order).scatter_(1, plan.row_order, in_sorted_order)

    def grad_weight(self, plan: _TorchPlan, values: Tensor, grad_out: Tensor) -> Tensor:
        t_values = values.reshape(-1)[plan.t_perm].to(grad_out.dtype)
        code_t = _csr(plan.t_crow, plan.t_col, t_values, (plan.n_latents, grad_out.shape[0]))
        return code_t @ grad_out.contiguous()


_BACKENDS: dict[str, DecodeBackend] = {"torch": TorchBackend()}


def register_backend(name: str, backend: DecodeBackend) -> None:
    """Make ``backend`` selectable as ``sparse_decode(..., backend=name)``."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_backend: name = {name!r} is not valid; expected a non-empty name other than 'auto'")
    _BACKENDS[name] = backend


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def _resolve(backend: str, device: torch.device) -> tuple[str, DecodeBackend]:
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and "triton" in _BACKENDS else "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"backend = {backend!r} is not valid; expected 'auto' or one of {list(_BACKENDS)}")
    return backend, _BACKENDS[backend]


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, weight: Tensor, code: SparseCode, name: str, impl: DecodeBackend) -> Tensor:
        ctx.save_for_backward(values, weight)
        ctx.code, ctx.name, ctx.impl = code, name, impl
        return impl.forward(values, code.indices, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        values, weight = ctx.saved_tensors
        code, impl = ctx.code, ctx.impl
        plan = code._plans.get(ctx.name)
        if plan is None:
            plan = code._plans[ctx.name] = impl.plan(code.indices, code.n_latents)
        grad_values = impl.grad_values(plan, grad_out, weight) if ctx.needs_input_grad[0] else None
        grad_weight = impl.grad_weight(plan, values, grad_out) if ctx.needs_input_grad[1] else None
        return grad_values, grad_weight, None, None, None


def sparse_decode(code: SparseCode, weight: Tensor, backend: str = "auto") -> Tensor:
    """Decode ``code`` with dictionary ``weight`` [m, d] -> [N, d], differentiable in values and weight.

    ``backend``: ``"auto"`` (Triton on CUDA when registered, else torch) or a name from
    ``available_backends()``. Decoding one code into several dictionaries shares the backward's index plan.
    """
    if weight.dim() != 2 or weight.shape[0] != code.n_latents:
        raise ValueError(f"sparse_decode: weight shape {tuple(weight.shape)} is not valid; expected "
                         f"[n_latents={code.n_latents}, d]")
    if code.values.device != weight.device:
        raise ValueError(f"sparse_decode: code on {code.values.device} but weight on {weight.device}")
    name, impl = _resolve(backend, weight.device)
    return _SparseDecode.apply(code.values, weight, code, name, impl)


def dense_decode_reference(code: SparseCode, weight: Tensor) -> Tensor:
    """Brute-force reference (tests only): ``code.to_dense() @ weight``."""
    return code.to_dense().to(weight.dtype) @ weight
