r"""The encoder of a USAE step without its dense weight-gradient GEMM.

Encoder: h = X Wᵀ + b (X [B, d], W [m, d]), then either pre = h (``linear``) or BatchNorm1d in training
mode (batch statistics):  μ_j = w_j·x̄ + b_j,  var_j = (1/B) Σ_b (h_bj − μ_j)²,  σ_j = sqrt(var_j + eps),
ŷ = (h − μ)/σ,  pre = y = γ ŷ + β.  After TopK (and AuxK) the loss depends on ``pre`` only at a few
positions per token, so its gradient g = ∂L/∂y is sparse: nonzero only at the gathered entries.

Linear encoder: dW = Gᵀ X (a segmented sum over the gathered entries, O(B·K·d)), db = Σ_b g.

BatchNorm (derivation). The standard BN backward is ∂L/∂h_bj = (γ_j/σ_j)(g_bj − ḡ_j − ŷ_bj c_j) with
ḡ_j = mean_b g_bj and c_j = mean_b g_bj ŷ_bj. Hence, with Xc = X − x̄ and C = Xcᵀ Xc = XᵀX − B x̄ x̄ᵀ:

- dW_j = Σ_b ∂L/∂h_bj x_b = (γ_j/σ_j)[(GᵀX)_j − ḡ_j Σ_b x_b − c_j Σ_b ŷ_bj x_b], and since
  ŷ_bj = w_j·(x_b − x̄)/σ_j, Σ_b ŷ_bj x_b = (1/σ_j) Σ_b x_b (x_b − x̄)ᵀ w_j = C w_j / σ_j; also
  (GᵀX)_j − ḡ_j Σ_b x_b = Σ_b g_bj (x_b − x̄) = (Gᵀ Xc)_j. So  dW_j = (γ_j/σ_j)[(Gᵀ Xc)_j − (c_j/σ_j) C w_j].
- db_j = Σ_b ∂L/∂h_bj = (γ_j/σ_j)(B ḡ_j − B ḡ_j − c_j Σ_b ŷ_bj) = 0 exactly (Σ_b ŷ_bj = 0).
- dγ_j = Σ_b g_bj ŷ_bj = B c_j,   dβ_j = Σ_b g_bj = B ḡ_j, and since ŷ_bj = w_j·xc_b/σ_j,
  Σ_b g_bj ŷ_bj = w_j·(Gᵀ Xc)_j / σ_j: no ŷ is needed at all, only the row (Gᵀ Xc)_j computed anyway.

Gᵀ Xc is sparse (O(B·K·d)); the d×d Gram C costs B·d² and W C costs m·d², instead of the B·m·d of the
dense Gᵀ X. The forward reuses the same quantities: h − μ = Xc Wᵀ (the bias cancels) and
var_j = w_j·(C w_j)/B, so pre = Xc (W·γ/σ)ᵀ + β is a single GEMM with BN folded in and no pass over the
[B, m] matrix for statistics. Running statistics are updated as ``nn.BatchNorm1d`` does (momentum, or a
cumulative average when momentum is None; unbiased running variance).

``encoder_forward`` computes ``pre`` without autograd; ``gather_pre`` returns pre at given [N, K] positions
(the TopK code) and backpropagates with the formulas above, Gᵀ Xc as a segmented sum over the entries
grouped by latent; ``dense_pre`` returns all of ``pre`` (or some of its columns: the dead latents of AuxK)
with the same exact backward for a dense g (Gᵀ Xc as one GEMM; for the official auxiliary loss and AuxK).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from usae.core.kernels.dispatch import segment_rows, segment_rows_grouped
from usae.core.kernels.groups import LatentGroups, group_by_latent
from usae.core.kernels.scratch import row_dots, scratch
from usae.core.kernels.select import topk_indices

__all__ = ["EncoderPass", "TopKPass", "encoder_forward", "encoder_topk", "gather_pre", "dense_pre"]


@dataclass
class EncoderPass:
    """What the backward needs from one encoder forward.

    pre: [N, m] pre-activations (no grad; None after ``encoder_topk``, which never forms them);
    inputs: [N, d] Xc = X − x̄ (BN) or X (linear);
    weight_gram: [m, d] W·C (BN only); inv_std: [m] 1/σ (BN only).
    """

    pre: Tensor | None
    inputs: Tensor
    linear: nn.Linear
    bn: nn.BatchNorm1d | None
    weight_gram: Tensor | None = None
    inv_std: Tensor | None = None


def _affine(bn: nn.BatchNorm1d, m: int, like: Tensor) -> tuple[Tensor, Tensor]:
    if bn.affine:
        return bn.weight, bn.bias
    return like.new_ones(m), like.new_zeros(m)


def _check_forward(linear: nn.Linear, bn: nn.BatchNorm1d | None, x: Tensor, bf16: bool, who: str) -> None:
    if x.dim() != 2 or x.shape[1] != linear.in_features:
        raise ValueError(f"{who}: x has shape {tuple(x.shape)}; expected [N, {linear.in_features}]")
    if bf16 and x.device.type != "cuda":
        raise ValueError(f"{who}: bf16=True is only supported on CUDA, x is on {x.device}")
    if bn is not None and not (bn.training or not bn.track_running_stats):
        raise ValueError(f"{who}: BatchNorm is in eval mode; the fused encoder is for training "
                         "(use UniversalSAE.encode_pre for inference)")
    if bn is not None and x.shape[0] < 2:
        raise ValueError(f"{who}: batch of {x.shape[0]} row(s); BatchNorm training needs at least 2")


@torch.no_grad()
def _fold(linear: nn.Linear, bn: nn.BatchNorm1d | None, x: Tensor
          ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """BatchNorm folded into the encoder: (inputs [N, d], scaled [m, d], shift [m] or None, W·C, 1/σ) with
    pre = inputs · scaledᵀ + shift; updates BN's running statistics. ``scaled`` is a scratch tensor."""
    n, m = x.shape[0], linear.out_features
    weight = linear.weight
    if bn is None:
        return x, weight, linear.bias, None, None
    mean_x = x.mean(0)
    inputs = x - mean_x
    weight_gram = weight @ (inputs.t() @ inputs)                      # W C   [m, d]
    var = row_dots(weight_gram, weight) / n                            # biased batch variance of h
    inv_std = (var + bn.eps).rsqrt()
    gamma, beta = _affine(bn, m, var)
    scaled = torch.mul(weight, (gamma * inv_std).unsqueeze(1), out=scratch("encoder.scaled", weight.shape, weight))
    if bn.training and bn.track_running_stats:
        _update_running(bn, weight @ mean_x + (linear.bias if linear.bias is not None else 0), var, n)
    return inputs, scaled, beta, weight_gram, inv_std


def _gemm(inputs: Tensor, scaled: Tensor, shift: Tensor | None, out: Tensor | None) -> Tensor:
    if shift is None:
        return inputs @ scaled.t() if out is None else torch.mm(inputs, scaled.t(), out=out)
    return torch.addmm(shift, inputs, scaled.t()) if out is None else torch.addmm(shift, inputs, scaled.t(), out=out)


def encoder_forward(linear: nn.Linear, bn: nn.BatchNorm1d | None, x: Tensor, *, out: Tensor | None = None,
                    bf16: bool = False) -> EncoderPass:
    """x [N, d] -> ``EncoderPass`` with pre [N, m] (BN in training mode; its running statistics are updated).

    out: optional [N, m] float32 buffer to write pre into (reused across steps it saves page faults on CPU);
    bf16: run the one big GEMM in bfloat16 (CUDA only; statistics and gradients stay float32).
    """
    _check_forward(linear, bn, x, bf16, "encoder_forward")
    with torch.no_grad():
        inputs, scaled, shift, weight_gram, inv_std = _fold(linear, bn, x)
        if bf16:
            pre = (inputs.to(torch.bfloat16) @ scaled.to(torch.bfloat16).t()).float()
            if shift is not None:
                pre.add_(shift)
        else:
            pre = _gemm(inputs, scaled, shift, out)
    return EncoderPass(pre, inputs, linear, bn, weight_gram, inv_std)


# rows per block of ``encoder_topk``: a [2048, m] scratch block instead of all of [N, m]. Measured on a 2-core AMD
# EPYC at N = 6272 (encoder + TopK alone, against one unblocked pass): 1024-row blocks cost 13-17 % more time at
# m = 6144 and 24576, 2048-row blocks 3-10 %, for a third of the memory.
BLOCK_ROWS = 2048


@dataclass
class TopKPass:
    """What ``encoder_topk`` returns: the encoder pass (``enc.pre`` is None: the [N, m] matrix never existed),
    the TopK ``indices`` [N, k] and their ``values`` [N, k] (pre at those positions, no grad), and the
    pre-activations of the requested ``columns`` [N, C] (None when no columns were asked for)."""

    enc: EncoderPass
    indices: Tensor
    values: Tensor
    columns_pre: Tensor | None


def encoder_topk(linear: nn.Linear, bn: nn.BatchNorm1d | None, x: Tensor, k: int, *, columns: Tensor | None = None,
                 all_columns: bool = False, block_rows: int = BLOCK_ROWS) -> TopKPass:
    """The encoder and TopK in blocks of ``block_rows`` rows: each block's pre-activations [block_rows, m] are
    computed into one reused scratch block, searched for their k largest entries and dropped, so the peak
    memory holds one block instead of [N, m] (the BatchNorm statistics come from the Gram matrix, not from
    pre). ``columns`` [C] (or ``all_columns``): also keep pre at those latents, [N, C] (AuxK's dead latents).
    Same values as ``encoder_forward`` + ``topk_indices`` up to the GEMM's rounding for a different row count."""
    _check_forward(linear, bn, x, False, "encoder_topk")
    if block_rows < 1:
        raise ValueError(f"encoder_topk: block_rows = {block_rows} is not valid; expected >= 1")
    n, m = x.shape[0], linear.out_features
    with torch.no_grad():
        inputs, scaled, shift, weight_gram, inv_std = _fold(linear, bn, x)
        indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
        values = torch.empty(n, k, dtype=x.dtype, device=x.device)
        kept = None
        if all_columns or columns is not None:
            kept = torch.empty(n, m if all_columns else columns.numel(), dtype=x.dtype, device=x.device)
        block = scratch("encoder.block", (min(block_rows, n), m), x)
        for r0 in range(0, n, block_rows):
            r1 = min(n, r0 + block_rows)
            pre = _gemm(inputs[r0:r1], scaled, shift, block[:r1 - r0])
            idx = topk_indices(pre, k)
            indices[r0:r1] = idx
            torch.gather(pre, 1, idx, out=values[r0:r1])
            if kept is not None:
                kept[r0:r1] = pre if all_columns else pre.index_select(1, columns)
    return TopKPass(EncoderPass(None, inputs, linear, bn, weight_gram, inv_std), indices, values, kept)


def _update_running(bn: nn.BatchNorm1d, mean: Tensor, var: Tensor, n: int) -> None:
    """The running-statistics update of ``nn.BatchNorm1d`` in training mode."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    bn.running_var.mul_(1 - factor).add_(var * (n / (n - 1)), alpha=factor)


def _params(enc: EncoderPass) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    gamma = beta = None
    if enc.bn is not None and enc.bn.affine:
        gamma, beta = enc.bn.weight, enc.bn.bias
    return enc.linear.weight, enc.linear.bias, gamma, beta


def _weight_grads(enc: EncoderPass, rows: Tensor, sum_g: Tensor, needs: tuple[bool, ...],
                  columns: Tensor | None = None):
    """(dW, db, dγ, dβ) from rows = Gᵀ·inputs [C, d] and Σ_b g [C] of latents ``columns`` (None: all m).

    With BN, Σ_b g_bj ŷ_bj = w_j·(Σ_b g_bj xc_b)/σ_j = (w_j·rows_j)/σ_j: no ŷ is ever materialised.
    """
    n, m = enc.inputs.shape[0], enc.linear.out_features
    w, b, gamma, beta = _params(enc)
    sel = slice(None) if columns is None else columns

    def full(part: Tensor) -> Tensor:  # [C, ...] -> [m, ...], zero outside ``columns``
        return part if columns is None else part.new_zeros((m,) + part.shape[1:]).index_copy_(0, columns, part)

    if enc.bn is None:
        return full(rows) if needs[0] else None, full(sum_g) if needs[1] and b is not None else None, None, None
    inv_std = enc.inv_std[sel]
    sum_gy = row_dots(rows, enc.linear.weight.detach()[sel]) * inv_std              # Σ_b g ŷ   [C]
    dw = None
    if needs[0]:
        scale = (gamma.detach()[sel] if gamma is not None else torch.ones_like(inv_std)) * inv_std
        c = sum_gy / n
        dw = full(rows.addcmul_(enc.weight_gram[sel], (c * inv_std).unsqueeze(1), value=-1).mul_(scale.unsqueeze(1)))
    db = torch.zeros_like(b) if needs[1] and b is not None else None
    dgamma = full(sum_gy) if needs[2] and gamma is not None else None
    dbeta = full(sum_g) if needs[3] and beta is not None else None
    return dw, db, dgamma, dbeta


class _GatherPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, gamma, beta, enc: EncoderPass, indices: Tensor, groups: LatentGroups | None,
                values: Tensor | None):
        ctx.enc, ctx.indices, ctx.groups = enc, indices, groups
        return enc.pre.gather(1, indices) if values is None else values.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        enc, indices = ctx.enc, ctx.indices
        groups = ctx.groups if ctx.groups is not None else group_by_latent(indices, enc.linear.out_features)
        g = groups.gather(grad.float())                                          # [E] grouped by latent
        rows = segment_rows_grouped(groups, g, enc.inputs)                       # Gᵀ·inputs  [m, d]
        sum_g = segment_rows(groups.offsets, torch.arange(g.shape[0], device=g.device), None, g.unsqueeze(1))
        return (*_weight_grads(enc, rows, sum_g.squeeze(1), ctx.needs_input_grad[:4]), None, None, None, None)


def gather_pre(enc: EncoderPass, indices: Tensor, groups: LatentGroups | None = None,
               values: Tensor | None = None) -> Tensor:
    """pre at positions ``indices`` [N, K'] -> values [N, K'], differentiable w.r.t. the encoder parameters.

    groups: ``group_by_latent(indices, m)`` when the caller already has it (else built in the backward).
    values: those pre-activations when already known (``encoder_topk``; required when ``enc.pre`` is None).
    Repeated positions are fine (their gradients add). No gradient flows to the input x.
    """
    n = enc.inputs.shape[0]
    if indices.dim() != 2 or indices.shape[0] != n or indices.dtype != torch.int64:
        raise ValueError(f"gather_pre: indices {indices.dtype} {tuple(indices.shape)} are not valid; expected "
                         f"int64 [{n}, K]")
    if values is None and enc.pre is None:
        raise ValueError("gather_pre: this encoder pass kept no pre-activations (encoder_topk); pass its values")
    if values is not None and values.shape != indices.shape:
        raise ValueError(f"gather_pre: values {tuple(values.shape)} do not match indices {tuple(indices.shape)}")
    return _GatherPre.apply(*_params(enc), enc, indices, groups, values)


class _ColumnsPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, gamma, beta, enc: EncoderPass, columns: Tensor | None, values: Tensor | None):
        ctx.enc, ctx.columns = enc, columns
        if values is not None:
            return values.view_as(values)
        return enc.pre.view_as(enc.pre) if columns is None else enc.pre.index_select(1, columns)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        grad = grad.float().contiguous()
        rows = grad.t() @ ctx.enc.inputs                                         # Gᵀ·inputs  [C, d] (dense)
        grads = _weight_grads(ctx.enc, rows, grad.sum(0), ctx.needs_input_grad[:4], ctx.columns)
        return (*grads, None, None, None)


def dense_pre(enc: EncoderPass, columns: Tensor | None = None, values: Tensor | None = None) -> Tensor:
    """pre [N, m] (or its ``columns`` [C]: [N, C]), differentiable w.r.t. the encoder parameters through the
    exact formulas above with a dense gradient (one [C, N] x [N, d] GEMM). values: those pre-activations
    when already known (``TopKPass.columns_pre``; required when ``enc.pre`` is None)."""
    if values is None and enc.pre is None:
        raise ValueError("dense_pre: this encoder pass kept no pre-activations (encoder_topk); pass its values")
    return _ColumnsPre.apply(*_params(enc), enc, columns, values)
