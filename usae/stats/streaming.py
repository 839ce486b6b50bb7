"""Streaming evaluation straight from images: R² matrix, firing statistics and top images in one pass.

``evaluate_online(model, backbones, images, grid)`` runs every image once through the backbones (an
:class:`usae.data.online.OnlineSource`), encodes each model's tokens with its own encoder, and feeds the same
accumulators the store-based path uses: ``usae.stats.reconstruction.R2Accumulator`` (what ``reconstruction_stats``
returns), ``usae.stats.firing.FiringAccumulator`` (``firing_stats``) and the top images of ``usae.stats.galleries``
(``top_images``). Memory is bounded by one batch of images plus O(M² + M·d) for R², O(M·m) for firing and
O(C·n_top) for top images, whatever the number of images; codes stay sparse.

Top images of *all* concepts (``concepts=None``) come out of the same pass, so no second pass is needed to
make galleries of the concepts the firing statistics single out; per image this scores the ``m`` concepts
from the sparse codes (``"mean"`` or ``"max"`` pooling; ``"quantile"`` needs explicit ``concepts``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from usae._checks import positive_int
from usae.core.model import UniversalSAE
from usae.data.online import OnlineSource, Standardisation
from usae.stats.firing import FiringAccumulator, FiringStats, decoder_atom_norms
from usae.stats.galleries import POOLINGS, TopImages, concept_values, pool_heatmaps
from usae.stats.reconstruction import R2Accumulator

__all__ = ["OnlineEvaluation", "evaluate_online", "evaluate_source", "model_standardisations"]


@dataclass
class OnlineEvaluation:
    """What one pass gives: ``reconstruction`` (as ``reconstruction_stats``), ``firing`` (as ``firing_stats``),
    ``top`` (as ``galleries.top_images``; None when not asked for), images and tokens seen, seconds."""

    reconstruction: R2Accumulator
    firing: FiringStats
    top: TopImages | None
    n_images: int
    n_tokens: int
    seconds: float

    def r2(self, baseline: str = "global") -> Tensor:
        """[M, M] cross-model R² (row = encoder, column = decoder)."""
        return self.reconstruction.matrix(baseline)


def model_standardisations(model: UniversalSAE) -> dict[str, Standardisation]:
    """The standardisation each model's rows had in training, as stored in ``model`` (``set_standardisation``)."""
    out = {}
    for name in model.names:
        stats = model.standardisation(name)
        if stats is None:
            raise ValueError(f"model has no standardisation for {name!r}; pass stats=... (e.g. the training "
                             "store's .stats) or call model.set_standardisation first")
        mean, std = stats
        out[name] = Standardisation(mean.cpu(), std.cpu(), "scalar" if mean.dim() == 0 else "channel")
    return out


class _Best:
    """The ``n_top`` highest scores per concept seen so far, with their image indices (lower index wins ties)."""

    def __init__(self, n_concepts: int, n_top: int) -> None:
        self.n_top, self.seen = n_top, 0
        self.scores = torch.full((n_concepts, 0), -math.inf)
        self.images = torch.zeros((n_concepts, 0), dtype=torch.int64)

    def add(self, scores: Tensor) -> None:
        """scores: [C, B] of the next B images."""
        img = torch.arange(self.seen, self.seen + scores.shape[1]).expand(scores.shape[0], -1)
        self.seen += scores.shape[1]
        all_s, all_i = torch.cat([self.scores, scores.float()], 1), torch.cat([self.images, img], 1)
        order = torch.sort(-all_s, dim=1, stable=True).indices[:, :self.n_top]
        self.scores, self.images = all_s.gather(1, order), all_i.gather(1, order)

    def result(self, concepts: Tensor, split: str, pooling: str, quantile: float) -> TopImages:
        s, i, pad = self.scores, self.images, self.n_top - self.scores.shape[1]
        if pad > 0:
            s = torch.cat([s, torch.full((len(concepts), pad), -math.inf)], 1)
            i = torch.cat([i, torch.full((len(concepts), pad), -1, dtype=torch.int64)], 1)
        return TopImages(concepts, i, s.float(), split, pooling, float(quantile))


def _all_concept_scores(codes: Mapping[str, Any], t: int, m: int, pooling: str) -> Tensor:
    """[m, B] pooled cross-model average heatmap of every concept on B whole images, from sparse codes."""
    n_rows = len(next(iter(codes.values())).values)
    n_img, device = n_rows // t, next(iter(codes.values())).values.device
    token = torch.arange(n_rows, device=device).unsqueeze(1)
    keys = torch.cat([(token * m + c.indices).reshape(-1) for c in codes.values()])
    vals = torch.cat([c.values.reshape(-1).float() for c in codes.values()]) / len(codes)
    out = torch.zeros(n_img * m, device=device)
    if pooling == "mean":
        out.index_add_(0, keys // (t * m) * m + keys % m, vals)
        out /= t
    else:  # max over tokens of the per-token cross-model average (absent = 0; codes are >= 0)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(len(uniq), device=device).index_add_(0, inverse, vals)
        out.scatter_reduce_(0, uniq // (t * m) * m + uniq % m, sums, "amax", include_self=True)
    return out.view(n_img, m).T.cpu()


@torch.no_grad()
def evaluate_source(model: UniversalSAE, source: OnlineSource, split: str = "val", *, concepts: Any = None,
                    top: bool = True, n_top: int = 8, pooling: str = "mean", quantile: float = 0.9,
                    threshold: float = 0.1, images_per_batch: int = 64, diagonal_only: bool = False,
                    backend: str = "auto") -> OnlineEvaluation:
    """One pass over ``split`` of ``source`` (images in order, eval mode): see the module docstring.

    concepts: ids for the top images (None: all ``m``); ``top=False`` skips them. ``images_per_batch``
    whole images per batch (64 toy images = the store path's default 4096 rows, which makes the per-batch
    ``"batch_mean"`` R² identical too).
    """
    missing = [n for n in model.names if n not in source.dims]
    if missing:
        raise ValueError(f"the source has no backbone for model(s) {missing}; it has {list(source.models)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling = {pooling!r} is not valid; expected one of {list(POOLINGS)}")
    positive_int("n_top", n_top)
    positive_int("images_per_batch", images_per_batch)
    m, t, names = model.n_latents, source.tokens_per_image, model.names
    ids = None
    if concepts is not None:
        ids = torch.as_tensor(concepts, dtype=torch.int64).reshape(-1)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= m or ids.unique().numel() != ids.numel():
            raise ValueError(f"concepts = {ids.tolist()} is not valid; expected distinct ids in [0, {m})")
    elif top and pooling == "quantile":
        raise ValueError("pooling = 'quantile' needs explicit concepts=[...]; 'mean' and 'max' score all concepts")
    r2 = R2Accumulator(names, model.dims)
    fires = FiringAccumulator(names, m, threshold)
    best = _Best(m if ids is None else len(ids), n_top)
    device = next(model.parameters()).device
    was_training, began = model.training, time.perf_counter()
    model.eval()
    try:
        batches = source.batches(split, images_per_batch * t, shuffle=False, drop_last=False, models=names)
        for raw in batches:
            x = {n: v.to(device) for n, v in model.check_batch(raw).items()}
            codes = {n: model.encode(n, x[n]) for n in names}
            for i, name in enumerate(names):
                for target, est in model.decode(codes[name], (name,) if diagonal_only else names,
                                                backend=backend).items():
                    r2.update(i, model.index(target), x[target], est)
            fires.update(codes)
            if top:
                n_img = len(x[names[0]]) // t
                if ids is None:
                    best.add(_all_concept_scores(codes, t, m, pooling))
                else:
                    avg = sum(concept_values(c, ids).cpu() for c in codes.values()) / len(codes)
                    best.add(pool_heatmaps(avg.reshape(n_img, t, len(ids)).permute(2, 0, 1), pooling, quantile))
    finally:
        model.train(was_training)
    if not fires.n_tokens:
        raise ValueError(f"split {split!r} gave no tokens; nothing to evaluate")
    result = best.result(torch.arange(m) if ids is None else ids, split, pooling, quantile) if top else None
    return OnlineEvaluation(r2, fires.result(decoder_atom_norms(model)), result, fires.n_tokens // t,
                            fires.n_tokens, time.perf_counter() - began)


def evaluate_online(model: UniversalSAE, backbones: Mapping[str, nn.Module], images: Any, grid: int, *,
                    split: str = "val", stats: Mapping[str, Standardisation] | None = None,
                    block_images: int = 32, image_size: int | None = None, autocast: torch.dtype | None = None,
                    progress: bool = True, **options: Any) -> OnlineEvaluation:
    """Evaluate ``model`` on ``images`` (a folder, an ImageSource, a tensor ...) seen through ``backbones``.

    ``stats``: the standardisation of each model's tokens (default: the one stored in ``model``, i.e. the
    training store's). ``options``: those of :func:`evaluate_source` (concepts, n_top, pooling, threshold ...).
    """
    if not isinstance(backbones, Mapping) or any(n not in backbones for n in model.names):
        have = list(backbones) if isinstance(backbones, Mapping) else type(backbones).__name__
        raise ValueError(f"backbones = {have} is not valid; expected a mapping with a backbone for each of "
                         f"{list(model.names)}")
    stats = model_standardisations(model) if stats is None else stats
    source = OnlineSource({n: backbones[n] for n in model.names}, {split: images}, grid, stats=stats,
                          block_images=block_images, image_size=image_size, autocast=autocast, progress=progress)
    return evaluate_source(model, source, split, **options)
