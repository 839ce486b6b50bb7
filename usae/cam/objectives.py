"""Objectives: what CAM maximises, composable with ``+``, ``-`` and scalar ``*`` (Lucent style).

An :class:`Objective` maps a :class:`~usae.cam.render.CamContext` (the step's images and, per model, the
standardised tokens of its views) to one value per image ``[B]``; the render loop maximises the sum.

- :func:`concept`: the *pre-TopK* activation of USAE concept ``k`` through model ``name`` (post-BatchNorm,
  pre-ReLU, from ``UniversalSAE.encode_pre``), so there is a gradient even on tokens where ``k`` is not in
  the top k. It is reduced over tokens (``"mean"`` or ``"max"``) and averaged over views. Raw backbone
  tokens get the model's standardisation (``UniversalSAE.standardise``). BatchNorm always uses its running
  statistics (eval mode), whatever mode the module is in.
- :func:`total_variation`, :func:`l2`: naturalness regularisers, to be added with a negative weight
  (``concept("toy_vit", 7) - 0.1 * total_variation()``).

:func:`concept_head` folds standardisation, Linear and eval-mode BatchNorm of one concept into one affine
map ``tokens @ weight + bias``; that is all an objective needs of the encoder (``d`` multiply-adds per
token instead of ``d * m``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from usae._checks import nonneg_int

__all__ = ["Objective", "concept", "total_variation", "l2", "concept_head", "concept_activation",
           "reduce_tokens", "REDUCTIONS"]

REDUCTIONS = ("mean", "max")


def _check_concept(sae: Any, name: str, k: int) -> None:
    sae.index(name)  # ValueError naming the valid models
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < sae.n_latents:
        raise ValueError(f"concept index k = {k!r} is not valid; expected an integer in [0, {sae.n_latents}) "
                         f"(the USAE has m = {sae.n_latents} concepts)")


def concept_head(sae: Any, name: str, ks: int | Sequence[int], standardised: bool = False) -> tuple[Tensor, Tensor]:
    """Affine map from tokens of model ``name`` to the pre-TopK activations of concepts ``ks``.

    Returns ``weight [d, c]`` and ``bias [c]`` (``c = len(ks)``; for an int ``k``: ``[d]`` and ``[]``) with
    ``tokens @ weight + bias == encode_pre(name, standardise(name, tokens))[..., ks]`` (BatchNorm in eval
    mode). ``standardised=True``: the tokens are already standardised (e.g. rows of an ActivationStore).
    """
    single = isinstance(ks, int) and not isinstance(ks, bool)
    ks = [ks] if single else list(ks)
    for k in ks:
        _check_concept(sae, name, k)
    coder = sae.coder(name)
    idx = torch.as_tensor(ks, dtype=torch.long)
    with torch.no_grad():
        weight = coder.linear.weight[idx].T.double()               # [d, c]
        bias = coder.linear.bias[idx].double() if coder.linear.bias is not None else torch.zeros(len(ks)).double()
        bn = coder.bn
        if bn is not None:
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(f"model {name!r}: BatchNorm has no running statistics; CAM needs eval-mode BN")
            scale = (bn.running_var[idx].double() + bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight[idx].double()
            shift = -bn.running_mean[idx].double() * scale + (bn.bias[idx].double() if bn.bias is not None else 0)
            weight, bias = weight * scale, bias * scale + shift
        if not standardised:
            stats = sae.standardisation(name)
            if stats is None:
                raise ValueError(f"no standardisation set for {name!r}; call set_standardisation first (raw "
                                 "backbone tokens must be standardised like the training rows)")
            from usae.core.model import STANDARDISATION_EPS

            mean, std = stats[0].double(), stats[1].double() + STANDARDISATION_EPS
            weight = weight / (std[:, None] if std.dim() else std)
            bias = bias - ((mean[:, None] if mean.dim() else mean) * weight).sum(0)
    weight, bias = weight.float(), bias.float()
    return (weight[:, 0], bias[0]) if single else (weight, bias)


def _channels_last(tokens: Tensor, dim: int) -> Tensor:
    """Tokens ``[..., d]`` as they are, or a CNN map ``[B, d, h, w]`` moved to ``[B, h, w, d]``."""
    if tokens.shape[-1] == dim:
        return tokens
    if tokens.dim() == 4 and tokens.shape[1] == dim:
        return tokens.permute(0, 2, 3, 1)
    raise ValueError(f"tokens of shape {tuple(tokens.shape)} are not valid for a model of width {dim}; expected "
                     f"[B, T, {dim}], [B, h, w, {dim}] or a CNN map [B, {dim}, h, w]")


def concept_activation(sae: Any, name: str, k: int, tokens: Tensor, standardised: bool = False) -> Tensor:
    """Pre-TopK activation of concept ``k`` on every token: ``[B, T, d]`` -> ``[B, T]``, ``[B, h, w, d]``
    (or a CNN map ``[B, d, h, w]``) -> ``[B, h, w]``. Raw tokens unless ``standardised``."""
    weight, bias = concept_head(sae, name, k, standardised)
    return _channels_last(tokens, weight.shape[0]) @ weight.to(tokens) + bias.to(tokens)


def reduce_tokens(acts: Tensor, how: str) -> Tensor:
    """Per-view reduction of token activations ``[V, ...]`` -> ``[V]`` (``"mean"`` or ``"max"``)."""
    if how not in REDUCTIONS:
        raise ValueError(f"token reduction {how!r} is not valid; expected one of {list(REDUCTIONS)}")
    flat = acts.reshape(acts.shape[0], -1)
    return flat.mean(1) if how == "mean" else flat.amax(1)


class Objective:
    """A differentiable score of the step's images, one value per image ``[B]``; higher is better.

    ``models``: the backbones it reads; ``concepts``: the (model, k) pairs it targets (checked before a
    render starts). Compose with ``a + b``, ``a - b``, ``w * a``, ``a / w``, ``-a`` and ``sum([...])``.
    """

    def __init__(self, fn: Callable[[Any], Tensor], description: str, models: Iterable[str] = (),
                 concepts: Iterable[tuple[str, int]] = (), compound: bool = False) -> None:
        self.fn, self.description = fn, description
        self.models = frozenset(models)
        self.concepts = tuple(dict.fromkeys(concepts))
        self._compound = compound

    def __call__(self, ctx: Any) -> Tensor:
        return self.fn(ctx)

    def __repr__(self) -> str:
        return f"Objective({self.description})"

    def _wrapped(self) -> str:
        return f"({self.description})" if self._compound else self.description

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, (int, float)):
            if other == 0:
                return self
            return Objective(lambda ctx: self(ctx) + other, f"{self.description} + {other:g}", self.models,
                             self.concepts, True)
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(lambda ctx: self(ctx) + other(ctx), f"{self.description} + {other.description}",
                         self.models | other.models, self.concepts + other.concepts, True)

    __radd__ = __add__  # sum([...]) starts from 0

    def __neg__(self) -> Objective:
        return -1.0 * self

    def __sub__(self, other: Objective | float) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda ctx: self(ctx) - other(ctx), f"{self.description} − {other._wrapped()}",
                             self.models | other.models, self.concepts + other.concepts, True)
        return self + (-other)

    def __mul__(self, weight: float) -> Objective:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            return NotImplemented
        return Objective(lambda ctx: weight * self(ctx), f"{weight:g} × {self._wrapped()}", self.models,
                         self.concepts)

    __rmul__ = __mul__

    def __truediv__(self, weight: float) -> Objective:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight == 0:
            return NotImplemented
        return self * (1.0 / weight)


def concept(name: str, k: int, reduce: str = "mean") -> Objective:
    """Pre-TopK activation of concept ``k`` through model ``name``, reduced over tokens, averaged over views."""
    nonneg_int("concept index k", k)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce = {reduce!r} is not valid; expected one of {list(REDUCTIONS)}")

    def fn(ctx: Any) -> Tensor:
        acts = ctx.concept_map(name, k)                       # [B * n, h, w]
        per_view = reduce_tokens(acts, reduce)                # [B * n]
        return per_view.view(ctx.batch, -1).mean(1)           # [B]

    return Objective(fn, f"concept {k} of {name} ({reduce} over tokens)", {name}, [(name, k)])


def total_variation() -> Objective:
    """Mean absolute difference between neighbouring pixels of the image (not the views): ``[B]``."""

    def fn(ctx: Any) -> Tensor:
        x = ctx.images
        return (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + \
            (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))

    return Objective(fn, "total variation")


def l2(centre: float = 0.5) -> Objective:
    """Mean squared distance of the image's pixels from ``centre`` (mid-grey by default): ``[B]``."""
    return Objective(lambda ctx: (ctx.images - centre).square().mean((1, 2, 3)), f"L2 (from {centre:g})")
