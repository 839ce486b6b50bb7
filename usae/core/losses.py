"""Training losses of the USAE: per-target reconstruction error and the two auxiliary terms.

For a batch encoded by model i (pre-activations ``pre`` [N, m], code z) and every target model j
(activations x_j [N, d_j], reconstruction x̂_j = z D_j):

- ``reconstruction_error``: mean |x - x̂| (``"l1"``, the official default) or mean (x - x̂)² (``"l2"``).
- ``official_aux``: the official code's auxiliary term. u = ReLU(pre) with the k selected latents zeroed,
  keep the ⌊m/2⌋ largest entries of u per token, r̂_j = u D_j, aux_j = err(r_j, r̂_j) with the residual
  r_j = x_j - x̂_j **not** detached. Dense by nature: one [N, m] x [m, Σd] matmul for all targets.
- ``auxk_aux``: Gao et al. (2024) AuxK. The ``k_aux`` largest pre-activations among *dead* latents (given as a
  mask) form a code that reconstructs the detached residual: aux_j = err(r_j.detach(), ê_j). It is kept dense
  over the dead columns (``auxk_activations``, ``auxk_dense``): at k_aux = 512 that is faster than sparse.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from usae._checks import positive_int
from usae.core.kernels.dense import masked_decode
from usae.core.kernels.select import topk_indices
from usae.core.sparse import SparseCode

__all__ = ["LOSSES", "reconstruction_error", "top_mask", "keep_top_per_row", "official_aux", "auxk_aux",
           "auxk_mask", "auxk_dense"]

LOSSES = ("l1", "l2")


class _MeanError(torch.autograd.Function):
    """mean |e - t| or mean (e - t)² with a saved residual: two passes forward, two backward."""

    @staticmethod
    def forward(ctx, target: Tensor, estimate: Tensor, kind: str) -> Tensor:
        residual = estimate - target
        ctx.kind, ctx.numel = kind, residual.numel()
        ctx.save_for_backward(residual)
        order = 1 if kind == "l1" else 2
        total = torch.linalg.vector_norm(residual, order)
        return (total if kind == "l1" else total.square()) / max(1, residual.numel())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (residual,) = ctx.saved_tensors
        scale = grad / max(1, ctx.numel)
        grad_estimate = residual.sign() * scale if ctx.kind == "l1" else residual * (2 * scale)
        grad_target = -grad_estimate if ctx.needs_input_grad[0] else None
        return grad_target, grad_estimate if ctx.needs_input_grad[1] else None, None


def reconstruction_error(target: Tensor, estimate: Tensor, kind: str = "l1") -> Tensor:
    """Mean absolute (``"l1"``) or squared (``"l2"``) error over all elements: a scalar."""
    if kind not in LOSSES:
        raise ValueError(f"loss kind = {kind!r} is not valid; expected one of {list(LOSSES)}")
    if target.shape != estimate.shape:
        diff = target - estimate  # broadcasting: the plain formula
        return diff.abs().mean() if kind == "l1" else diff.square().mean()
    return _MeanError.apply(target, estimate, kind)


def top_mask(scores: Tensor, candidates: Tensor, n_keep: int) -> Tensor:
    """[N, m] bool: the ``n_keep`` highest-scoring candidates of each row (all of them when there are fewer).

    scores: [N, m]; candidates: [N, m] bool. TopK only runs on the rows that have more than ``n_keep``
    candidates, which makes the official ``topk(u, m/2)`` cheap (about half the rows need it).
    """
    with torch.no_grad():
        heavy = (candidates.sum(dim=1) > n_keep).nonzero().squeeze(1)
        if heavy.numel() == 0:
            return candidates
        mask = candidates.clone()
        rows = scores[heavy].masked_fill(~candidates[heavy], float("-inf"))
        top = rows.topk(n_keep, dim=1, sorted=False).indices
        mask[heavy] = torch.zeros_like(mask[heavy]).scatter_(1, top, True)
    return mask


def keep_top_per_row(u: Tensor, n_keep: int) -> Tensor:
    """u [N, m] (>= 0) with all but its ``n_keep`` largest entries per row set to 0 (differentiable).

    Equals ``scatter(topk(u, n_keep))`` up to ties (zeros contribute nothing either way).
    """
    return torch.where(top_mask(u.detach(), u.detach() > 0, n_keep), u, 0.0)


def official_aux(targets: Mapping[str, Tensor], recon: Mapping[str, Tensor], pre: Tensor, code: SparseCode,
                 dictionaries: Mapping[str, Tensor], kind: str = "l1") -> dict[str, Tensor]:
    """The official auxiliary loss for every target in ``dictionaries`` -> {name: scalar}.

    targets/recon: {name: [N, d]}; pre: [N, m] encoder pre-activations; code: its TopK code;
    dictionaries: {name: [m, d]} unit-row dictionaries (detach those that must get no gradient).
    u = ReLU(pre) - z is ``pre`` on the positive, unselected latents, so u_kept = pre * mask with the same
    gradient as the official formula.
    """
    with torch.no_grad():
        candidates = pre > 0
        candidates.scatter_(1, code.indices, False)
        mask = top_mask(pre, candidates, pre.shape[1] // 2)
    return _decode_errors(targets, {n: targets[n] - recon[n] for n in dictionaries}, pre, mask, dictionaries,
                          kind)


def _decode_errors(targets: Mapping[str, Tensor], residuals: Mapping[str, Tensor], pre: Tensor, mask: Tensor,
                   dictionaries: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """err(residual_j, (pre ⊙ mask) D_j) for every target: one GEMM for all dictionaries (``masked_decode``)."""
    names = list(dictionaries)
    estimates = masked_decode(pre, mask, [dictionaries[n] for n in names])
    parts = estimates.split([dictionaries[n].shape[1] for n in names], dim=1)
    return {n: reconstruction_error(residuals[n], e, kind) for n, e in zip(names, parts, strict=True)}


def auxk_mask(pre_dead: Tensor, k_aux: int) -> Tensor:
    """[N, C] bool: the ``k_aux`` largest entries of each row of pre_dead (all when C <= k_aux) that are > 0."""
    positive_int("auxk: k_aux", k_aux)
    with torch.no_grad():
        positive = pre_dead > 0
        if pre_dead.shape[1] <= k_aux:
            return positive
        keep = torch.zeros_like(positive).scatter_(1, topk_indices(pre_dead, k_aux), True)
        return keep.logical_and_(positive)


def auxk_dense(targets: Mapping[str, Tensor], recon: Mapping[str, Tensor], pre_dead: Tensor, columns: Tensor,
               k_aux: int, dictionaries: Mapping[str, Tensor], kind: str = "l2") -> dict[str, Tensor]:
    """AuxK terms {name: scalar}: err(detached residual_j, ReLU(top-k_aux of pre_dead) · D_j[columns]).

    pre_dead: [N, C] pre-activations of the dead latents ``columns`` [C] (differentiable). Dense on purpose:
    with k_aux = 512 among C dead latents a token uses 512/C of them (>= 8 % at m = 6144), where one GEMM
    over the C columns is many times faster than gathering N·512 dictionary rows.
    """
    every = columns.numel() == next(iter(dictionaries.values())).shape[0]
    rows = {n: d if every else d.index_select(0, columns) for n, d in dictionaries.items()}
    residuals = {n: (targets[n] - recon[n]).detach() for n in dictionaries}
    return _decode_errors(targets, residuals, pre_dead, auxk_mask(pre_dead, k_aux), rows, kind)


def auxk_aux(targets: Mapping[str, Tensor], recon: Mapping[str, Tensor], pre: Tensor, dead: Tensor, k_aux: int,
             dictionaries: Mapping[str, Tensor], kind: str = "l2", backend: str = "auto") -> dict[str, Tensor]:
    """Gao et al. AuxK for every target -> {name: scalar} (zeros when no latent is dead).

    dead: [m] bool, the latents that have not fired for long enough; the top ``min(k_aux, #dead)`` of their
    pre-activations per token (ReLU'd) decode the detached residual of each target. ``backend`` is accepted
    for compatibility (the dense path needs none).
    """
    if dead.shape != (pre.shape[1],) or dead.dtype != torch.bool:
        raise ValueError(f"auxk_aux: dead mask must be bool [{pre.shape[1]}], got {dead.dtype} {tuple(dead.shape)}")
    columns = dead.nonzero().squeeze(1)
    if columns.numel() == 0:
        return {n: pre.new_zeros(()) for n in dictionaries}
    pre_dead = pre if columns.numel() == pre.shape[1] else pre.index_select(1, columns)
    return auxk_dense(targets, recon, pre_dead, columns, k_aux, dictionaries, kind)
