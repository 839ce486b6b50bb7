"""Sparse codes and the two operations on them: TopK encoding and sparse decoding.

A code of N tokens over m latents with k active latents per token is kept as ``values: [N, k]`` and
``indices: [N, k]``; it is never densified outside tests. Decoding gathers the k decoder rows each token
uses, so it costs O(N·k·d) instead of the O(N·m·d) of a dense matmul, and so does its backward:

- ``grad_values[n, j] = <grad_out[n], weight[indices[n, j]]>``  (a sampled dense-dense product),
- ``grad_weight = Zᵀ · grad_out``, Z the sparse code, touching only the rows that were used.

The index work of the backward (grouping the code's entries by latent, ``usae.core.kernels.groups``) depends only
on the indices, so it is computed once per code and shared by every decoder the code is decoded into.
``sparse_decode_many`` decodes one code into all M dictionaries in one call: one value gradient for all of
them, weight gradients only for the dictionaries that require one.

Backends
--------
``sparse_decode`` dispatches to a named backend (``register_backend``). ``"torch"`` (``usae.core.kernels.torch_ops``:
blocked ``F.embedding_bag``, ``torch.sparse.sampled_addmm``, segmented ``embedding_bag``) runs on any device;
``"triton"`` (``usae.core.kernels.triton_backend``) registers itself on first use on CUDA and is what
``backend="auto"`` picks there. triton is imported only then, so CPU machines never need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from usae.core.kernels.dispatch import triton_module
from usae.core.kernels.groups import LatentGroups, group_by_latent
from usae.core.kernels.select import topk_indices
from usae.core.kernels.torch_ops import RowPattern, gather_sum, row_pattern, sampled_dots, segment_rows

__all__ = [
    "SparseCode",
    "DecodeBackend",
    "topk_encode",
    "sparse_decode",
    "sparse_decode_many",
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

    def detach(self) -> SparseCode:
        return SparseCode(self.values.detach(), self.indices, self.n_latents, self._plans)

    def to(self, device: torch.device | str) -> SparseCode:
        return SparseCode(self.values.to(device), self.indices.to(device), self.n_latents)

    def use_groups(self, groups: LatentGroups) -> None:
        """Adopt ``groups`` (built from this code's ``indices``, e.g. by the fused encoder) as ``latent_groups()``."""
        if groups.order.numel() != self.indices.numel() or groups.n_latents != self.n_latents:
            raise ValueError(f"groups of {groups.order.numel()} entries over {groups.n_latents} latents do not fit "
                             f"this code ({self.indices.numel()} entries over {self.n_latents} latents)")
        self._plans["groups"] = groups

    def latent_groups(self) -> LatentGroups:
        """The entries grouped by latent (built once per code, shared by every backward that needs it)."""
        groups = self._plans.get("groups")
        if groups is None:
            groups = self._plans["groups"] = group_by_latent(self.indices, self.n_latents)
        return groups

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
    indices = topk_indices(pre, k)
    return SparseCode(F.relu(pre.gather(1, indices)), indices, pre.shape[1])


# ----------------------------------------------------------------------------------------------------------
class DecodeBackend(Protocol):
    """What a decode backend provides (all tensors on one device; ``plan`` is backend-private).

    Optional, used by ``sparse_decode_many`` when present (else it loops over the methods below):
    ``forward_many(values, indices, weights) -> [out_j]``, ``grad_values_many(plan, grads, weights) -> [N, k]``
    (summed over dictionaries), ``grad_weights_many(plan, values, grads) -> [grad_j]``; and
    ``shares_groups = True`` when ``plan`` accepts ``groups=`` (the code's cached ``LatentGroups``).
    """

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
    pattern: RowPattern    # the code's rows as sorted CSR, for the sampled products of grad_values
    groups: LatentGroups   # the code's entries grouped by latent, for the segmented weight gradients


class TorchBackend:
    """Portable backend (``usae.core.kernels.torch_ops``): blocked embedding_bag forward, sampled_addmm for the
    value gradient, segmented embedding_bag over ``LatentGroups`` for weight gradients (no N×k×d buffer)."""

    def forward(self, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        return gather_sum(values, indices, [weight])[0]

    shares_groups = True  # ``plan`` accepts the code's cached ``LatentGroups``

    def plan(self, indices: Tensor, n_latents: int, groups: LatentGroups | None = None) -> _TorchPlan:
        groups = groups if groups is not None else group_by_latent(indices, n_latents)
        return _TorchPlan(row_pattern(indices, n_latents), groups)

    def grad_values(self, plan: _TorchPlan, grad_out: Tensor, weight: Tensor) -> Tensor:
        return sampled_dots(plan.pattern, [grad_out], [weight])

    def grad_weight(self, plan: _TorchPlan, values: Tensor, grad_out: Tensor) -> Tensor:
        return segment_rows(plan.groups.offsets, plan.groups.tokens, plan.groups.gather(values), grad_out.contiguous())

    # -- every decoder of one code at once ------------------------------------------------------------------
    def forward_many(self, values: Tensor, indices: Tensor, weights: Sequence[Tensor]) -> list[Tensor]:
        return gather_sum(values, indices, weights)

    def grad_values_many(self, plan: _TorchPlan, grads: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
        return sampled_dots(plan.pattern, grads, weights)

    def grad_weights_many(self, plan: _TorchPlan, values: Tensor, grads: Sequence[Tensor]) -> list[Tensor]:
        grouped = plan.groups.gather(values)
        return [segment_rows(plan.groups.offsets, plan.groups.tokens, grouped, g.contiguous()) for g in grads]


_BACKENDS: dict[str, DecodeBackend] = {"torch": TorchBackend()}


def register_backend(name: str, backend: DecodeBackend) -> None:
    """Make ``backend`` selectable as ``sparse_decode(..., backend=name)``."""
    if not isinstance(name, str) or not name or name in ("auto", "groups"):
        raise ValueError(f"register_backend: name = {name!r} is not valid; expected a non-empty name other than "
                         "'auto' and 'groups'")
    _BACKENDS[name] = backend


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def _load_triton() -> bool:
    """Register the Triton backend on first use on CUDA (False when triton cannot be imported)."""
    if "triton" not in _BACKENDS:
        module = triton_module()
        if module is None:
            return False
        _BACKENDS["triton"] = module.TritonBackend()
    return True


def _resolve(backend: str, device: torch.device) -> tuple[str, DecodeBackend]:
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _load_triton() else "torch"
    elif backend == "triton":
        _load_triton()
    if backend not in _BACKENDS:
        raise ValueError(f"backend = {backend!r} is not valid; expected 'auto' or one of {list(_BACKENDS)}")
    return backend, _BACKENDS[backend]


def _plan(code: SparseCode, name: str, impl: DecodeBackend) -> Any:
    """The backend's index plan of ``code`` (built on first use, then cached on the code)."""
    plan = code._plans.get(name)
    if plan is None:
        extra = {"groups": code.latent_groups()} if getattr(impl, "shares_groups", False) else {}
        plan = code._plans[name] = impl.plan(code.indices, code.n_latents, **extra)
    return plan


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
        plan = _plan(code, ctx.name, impl)
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


class _SparseDecodeMany(torch.autograd.Function):
    """One code decoded into several dictionaries; one index plan and one value gradient for all of them."""

    @staticmethod
    def forward(ctx, values: Tensor, code: SparseCode, name: str, impl: DecodeBackend, *weights: Tensor):
        ctx.save_for_backward(values, *weights)
        ctx.code, ctx.name, ctx.impl = code, name, impl
        if hasattr(impl, "forward_many"):
            return tuple(impl.forward_many(values, code.indices, list(weights)))
        return tuple(impl.forward(values, code.indices, w) for w in weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        values, *weights = ctx.saved_tensors
        code, impl = ctx.code, ctx.impl
        plan = _plan(code, ctx.name, impl)
        grads = [g.contiguous() for g in grads]  # unused outputs arrive as zeros (materialised)
        grad_values = None
        if ctx.needs_input_grad[0]:
            if hasattr(impl, "grad_values_many"):
                grad_values = impl.grad_values_many(plan, grads, weights)
            else:
                grad_values = sum(impl.grad_values(plan, g, w) for g, w in zip(grads, weights, strict=True))
            grad_values = grad_values.to(values.dtype)
        wanted = [j for j in range(len(weights)) if ctx.needs_input_grad[4 + j]]
        grad_weights: list[Tensor | None] = [None] * len(weights)
        if wanted:
            if hasattr(impl, "grad_weights_many"):
                parts = impl.grad_weights_many(plan, values, [grads[j] for j in wanted])
            else:
                parts = [impl.grad_weight(plan, values, grads[j]) for j in wanted]
            for j, part in zip(wanted, parts, strict=True):
                grad_weights[j] = part
        return (grad_values, None, None, None, *grad_weights)


def sparse_decode_many(code: SparseCode, weights: Sequence[Tensor], backend: str = "auto") -> list[Tensor]:
    """Decode ``code`` into every dictionary of ``weights`` ([m, d_j] each, widths may differ) -> [N, d_j] each.

    One pass for all dictionaries: the backward computes the gradient of the k values once for all of them
    and groups the code's entries by latent once; dictionaries that do not require grad (detached, frozen)
    get no weight gradient at all.
    """
    weights = list(weights)
    if not weights:
        raise ValueError("sparse_decode_many: weights is empty; expected at least one [n_latents, d] dictionary")
    for j, w in enumerate(weights):
        if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[0] != code.n_latents:
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"sparse_decode_many: weights[{j}] has shape {shape}; expected "
                             f"[n_latents={code.n_latents}, d]")
        if w.device != code.values.device:
            raise ValueError(f"sparse_decode_many: code on {code.values.device} but weights[{j}] on {w.device}")
    name, impl = _resolve(backend, weights[0].device)
    return list(_SparseDecodeMany.apply(code.values, code, name, impl, *weights))


def dense_decode_reference(code: SparseCode, weight: Tensor) -> Tensor:
    """Brute-force reference (tests only): ``code.to_dense() @ weight``."""
    return code.to_dense().to(weight.dtype) @ weight
