"""Training losses of the USAE: per-target reconstruction error and the two auxiliary terms.

For a batch encoded by model i (pre-activations ``pre`` [N, m], code z) and every target model j
(activations x_j [N, d_j], reconstruction x̂_j = z D_j):

- ``reconstruction_error``: mean |x - x̂| (``"l1"``, the official default) or mean (x - x̂)² (``"l2"``).
- ``official_aux``: the official code's auxiliary term. u = ReLU(pre) with the k selected latents zeroed,
  keep the ⌊m/2⌋ largest entries of u per token, r̂_j = u D_j, aux_j = err(r_j, r̂_j) with the residual
  r_j = x_j - x̂_j **not** detached. Dense by nature: one [N, m] x [m, Σd] matmul for all targets.
- ``auxk_aux``: Gao et al. (2024) AuxK. The ``k_aux`` largest pre-activations among *dead* latents (given as a
  mask) form a sparse code that reconstructs the detached residual: aux_j = err(r_j.detach(), ê_j).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from usae.sparse import SparseCode, sparse_decode

__all__ = ["LOSSES", "reconstruction_error", "top_mask", "keep_top_per_row", "official_aux", "auxk_aux"]

LOSSES = ("l1", "l2")


def reconstruction_error(target: Tensor, estimate: Tensor, kind: str = "l1") -> Tensor:
    """Mean absolute (``"l1"``) or squared (``"l2"``) error over all elements: a scalar."""
    if kind == "l1":
        return (target - estimate).abs().mean()
    if kind == "l2":
        return (target - estimate).square().mean()
    raise ValueError(f"loss kind = {kind!r} is not valid; expected one of {list(LOSSES)}")


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
    kept = torch.where(mask, pre, 0.0)
    estimates: dict[str, Tensor] = {}
    trainable = [n for n, d in dictionaries.items() if d.requires_grad]
    frozen = [n for n in dictionaries if n not in trainable]
    for group in (trainable, frozen):  # separate matmuls: no dictionary gradient is computed for frozen ones
        if group:
            stacked = torch.cat([dictionaries[n] for n in group], dim=1)
            parts = (kept @ stacked).split([dictionaries[n].shape[1] for n in group], dim=1)
            estimates.update(zip(group, parts))
    return {n: reconstruction_error(targets[n] - recon[n], estimates[n], kind) for n in dictionaries}


def auxk_aux(targets: Mapping[str, Tensor], recon: Mapping[str, Tensor], pre: Tensor, dead: Tensor, k_aux: int,
             dictionaries: Mapping[str, Tensor], kind: str = "l2", backend: str = "auto") -> dict[str, Tensor]:
    """Gao et al. AuxK for every target -> {name: scalar} (zeros when no latent is dead).

    dead: [m] bool, the latents that have not fired for long enough; the top ``min(k_aux, #dead)`` of their
    pre-activations per token (ReLU'd) decode the detached residual of each target.
    """
    if dead.shape != (pre.shape[1],) or dead.dtype != torch.bool:
        raise ValueError(f"auxk_aux: dead mask must be bool [{pre.shape[1]}], got {dead.dtype} {tuple(dead.shape)}")
    n_dead = int(dead.sum())
    if n_dead == 0:
        return {n: pre.new_zeros(()) for n in dictionaries}
    top = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=1, sorted=False)
    aux_code = SparseCode(F.relu(top.values), top.indices, pre.shape[1])
    return {n: reconstruction_error((targets[n] - recon[n]).detach(), sparse_decode(aux_code, d, backend), kind)
            for n, d in dictionaries.items()}
