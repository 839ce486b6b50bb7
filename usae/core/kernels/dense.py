"""Dense decoding of a masked activation matrix into several dictionaries (the auxiliary losses).

Both auxiliary losses decode a *dense-ish* code: the official one keeps the top m/2 unselected positive
pre-activations (up to 50 % of the entries), AuxK keeps the top 512 of the dead latents (>= 8 % at m = 6144).
At such densities one GEMM is many times faster on CPU than gathering rows, so this is dense on purpose.

``masked_decode(pre, mask, weights)`` = (pre ⊙ mask) @ [W_1 | … | W_M] as one autograd Function:

- forward: one GEMM against all dictionaries at once -> [N, Σd] (split it per target);
- backward: grad_pre = (grad @ [W_1 | … ]ᵀ) ⊙ mask, the mask applied in place on the GEMM's output (no extra
  [N, C] buffer), and grad W_j = (pre ⊙ mask)ᵀ grad_j only for the dictionaries that require one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["masked_decode"]


class _MaskedDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, mask: Tensor, *weights: Tensor) -> Tensor:
        kept = pre * mask if mask is not None else pre  # (pre is finite: same as where(mask, pre, 0))
        stacked = weights[0] if len(weights) == 1 else torch.cat(weights, dim=1)
        ctx.save_for_backward(kept, mask, stacked)
        ctx.widths = [w.shape[1] for w in weights]
        return kept @ stacked

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        kept, mask, stacked = ctx.saved_tensors
        grad = grad.contiguous()
        grad_pre = None
        if ctx.needs_input_grad[0]:
            grad_pre = grad @ stacked.t()
            if mask is not None:
                grad_pre.mul_(mask)
        grads_w: list[Tensor | None] = []
        start = 0
        for j, width in enumerate(ctx.widths):
            if ctx.needs_input_grad[2 + j]:
                grads_w.append(kept.t() @ grad[:, start:start + width].contiguous())
            else:
                grads_w.append(None)
            start += width
        return (grad_pre, None, *grads_w)


def masked_decode(pre: Tensor, mask: Tensor | None, weights: Sequence[Tensor]) -> Tensor:
    """(pre ⊙ mask) [N, C] @ [W_1 | … | W_M] ([C, d_j] each) -> [N, Σ d_j], one GEMM forward and one backward.

    mask: [N, C] bool (None keeps everything). Dictionaries that do not require grad get no gradient.
    """
    weights = list(weights)
    if not weights:
        raise ValueError("masked_decode: weights is empty; expected at least one [C, d] dictionary")
    if pre.dim() != 2 or (mask is not None and mask.shape != pre.shape):
        raise ValueError(f"masked_decode: pre {tuple(pre.shape)} and mask "
                         f"{None if mask is None else tuple(mask.shape)} must both be [N, C]")
    for j, w in enumerate(weights):
        if w.dim() != 2 or w.shape[0] != pre.shape[1]:
            raise ValueError(f"masked_decode: weights[{j}] has shape {tuple(w.shape)}; expected [{pre.shape[1]}, d]")
    return _MaskedDecode.apply(pre, mask, *weights)
