"""Top images of concepts for galleries (paper Fig. 4, 9-15): which images to show, and their heatmaps.

A concept's *heatmap* on an image is its code value ``Z_k^(i)`` on each of the image's ``G x G`` tokens
(0 where k is not among the token's TopK). As in the official ``example_visualization.py``, images are
ranked by the **cross-model average heatmap** ``mean_i Z_k^(i)``, pooled over the image's tokens:

- ``"mean"``: the spatial mean (the official choice; favours concepts covering the image);
- ``"max"``: the strongest token (favours small, sharp occurrences);
- ``"quantile"``: the ``quantile``-quantile of the tokens (linear interpolation, as ``torch.quantile``),
  between the two.

One streaming pass over whole images (rows in store order, never shuffled), each model's rows encoded by its
own encoder; only the requested concepts are gathered from the sparse codes, so a batch costs
O(B k M + B C) memory and the state O(C n_top). Ties are broken by the lower image index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from usae._checks import positive_int
from usae.stats import concepts, firing

POOLINGS = ("mean", "max", "quantile")
__all__ = ["POOLINGS", "TopImages", "Gallery", "concept_values", "pool_heatmaps", "top_images", "concept_heatmaps",
           "toy_images", "gallery_images", "galleries", "most_universal", "showcase_concepts"]


def _concept_ids(concepts: Any, n_latents: int) -> Tensor:
    ids = torch.as_tensor(concepts, dtype=torch.int64).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("concepts is empty; expected one or more concept ids")
    if int(ids.min()) < 0 or int(ids.max()) >= n_latents:
        raise ValueError(f"concepts hold ids in [{int(ids.min())}, {int(ids.max())}]; expected ids in "
                         f"[0, {n_latents})")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"concepts {ids.tolist()} contain duplicates; expected distinct ids")
    return ids


def concept_values(code: Any, concepts: Tensor) -> Tensor:
    """[N, C] code values of ``concepts`` [C] from a SparseCode [N, k] (0 where a concept is not in the code)."""
    lookup = torch.full((int(code.n_latents),), len(concepts), dtype=torch.int64, device=code.indices.device)
    lookup[concepts.to(code.indices.device)] = torch.arange(len(concepts), device=code.indices.device)
    slot = lookup[code.indices]                                              # [N, k], C = "not requested"
    out = torch.zeros(code.values.shape[0], len(concepts) + 1, dtype=torch.float32, device=code.values.device)
    out.scatter_add_(1, slot, code.values.float())
    return out[:, :-1]


def pool_heatmaps(maps: Tensor, pooling: str = "mean", quantile: float = 0.9) -> Tensor:
    """Pool heatmaps over their last dimension (tokens): maps [..., T] -> [...]."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling = {pooling!r} is not valid; expected one of {list(POOLINGS)}")
    if pooling == "mean":
        return maps.mean(-1)
    if pooling == "max":
        return maps.amax(-1)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile = {quantile} is not valid; expected a number in [0, 1]")
    return torch.quantile(maps, quantile, dim=-1)


@dataclass
class TopImages:
    """The ``n_top`` best images of each concept, best first.

    concepts: [C] int64; images: [C, n] int64 image indices of ``split`` (-1 where fewer images exist);
    scores: [C, n] float32 pooled cross-model heatmap (-inf where no image).
    """

    concepts: Tensor
    images: Tensor
    scores: Tensor
    split: str
    pooling: str
    quantile: float

    def of(self, concept: int) -> tuple[Tensor, Tensor]:
        """(image indices [n], scores [n]) of one concept id (only images that exist)."""
        hit = (self.concepts == int(concept)).nonzero()
        if hit.numel() == 0:
            raise ValueError(f"concept {concept} is not one of {self.concepts.tolist()}")
        row = int(hit[0, 0])
        keep = self.images[row] >= 0
        return self.images[row][keep], self.scores[row][keep]


def _tokens_per_image(acts: Any, grid: int | None) -> int:
    g = grid if grid is not None else getattr(acts, "grid", None)
    if not isinstance(g, int) or g <= 0:
        raise ValueError(f"grid = {g!r}: give the token grid side (an ActivationStore knows its own)")
    return g * g


@torch.no_grad()
def top_images(model: Any, acts: Any, concepts: Any, split: str = "val", n_top: int = 8, pooling: str = "mean",
               quantile: float = 0.9, grid: int | None = None, images_per_batch: int = 64,
               progress: bool = True) -> TopImages:
    """Rank every image of ``split`` for each concept by its pooled cross-model average heatmap.

    ``acts``: an ActivationStore (rows of ``split`` in order) or a dict ``name -> [N, d]`` with
    ``N = n_images * grid**2`` rows in store order (then ``grid`` is required). Streams whole images.
    """
    ids = _concept_ids(concepts, model.n_latents)
    pool_heatmaps(torch.zeros(1, 1), pooling, quantile)                     # validates pooling/quantile
    positive_int("n_top", n_top)
    positive_int("images_per_batch", images_per_batch)
    t = _tokens_per_image(acts, grid)
    best_s = torch.full((len(ids), 0), -math.inf)
    best_i = torch.zeros((len(ids), 0), dtype=torch.int64)
    seen = 0
    for codes in firing.encoded_batches(model, acts, split, images_per_batch * t, progress, desc="top images"):
        n_rows = len(next(iter(codes.values())))
        if n_rows % t:
            raise ValueError(f"a batch holds {n_rows} rows, not whole images of {t} tokens")
        avg = sum(concept_values(c, ids).cpu() for c in codes.values()) / len(codes)     # [B*T, C]
        scores = pool_heatmaps(avg.reshape(n_rows // t, t, len(ids)).permute(2, 0, 1), pooling, quantile)
        img = torch.arange(seen, seen + n_rows // t).expand(len(ids), -1)
        seen += n_rows // t
        all_s, all_i = torch.cat([best_s, scores], 1), torch.cat([best_i, img], 1)
        order = torch.sort(-all_s, dim=1, stable=True).indices[:, :n_top]  # stable: lower index wins ties
        best_s, best_i = all_s.gather(1, order), all_i.gather(1, order)
    pad = n_top - best_s.shape[1]
    if pad > 0:
        best_s = torch.cat([best_s, torch.full((len(ids), pad), -math.inf)], 1)
        best_i = torch.cat([best_i, torch.full((len(ids), pad), -1, dtype=torch.int64)], 1)
    return TopImages(ids, best_i, best_s.float(), split, pooling, float(quantile))


def _image_rows(acts: Any, name: str, split: str, start: int, stop: int) -> Tensor:
    if hasattr(acts, "rows"):
        return acts.rows(split, name, start, stop)
    return torch.as_tensor(acts[name][start:stop])


@torch.no_grad()
def concept_heatmaps(model: Any, acts: Any, images: Sequence[int] | Tensor, concepts: Any, split: str = "val",
                     grid: int | None = None) -> dict[str, Tensor]:
    """Per model, the heatmaps of ``concepts`` [C] on ``images`` [n]: ``{name: [C, n, G, G]}`` (code values).

    Reads only those images' rows (``acts`` as in :func:`top_images`); eval mode, no gradients.
    """
    ids = _concept_ids(concepts, model.n_latents)
    t = _tokens_per_image(acts, grid)
    g = int(round(math.sqrt(t)))
    imgs = [int(i) for i in torch.as_tensor(images, dtype=torch.int64).reshape(-1)]
    if not imgs:
        raise ValueError("images is empty; expected one or more image indices")
    if min(imgs) < 0:
        raise ValueError(f"images hold index {min(imgs)}; expected indices >= 0")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = {}
        for name in model.names:
            rows = torch.cat([_image_rows(acts, name, split, i * t, (i + 1) * t) for i in imgs])
            if rows.shape[0] != len(imgs) * t:
                raise ValueError(f"images {imgs} reach past the end of split {split!r}")
            code = model.encode(name, rows.to(device, torch.float32))
            vals = concept_values(code, ids).cpu()                          # [n*T, C]
            out[name] = vals.reshape(len(imgs), g, g, len(ids)).permute(3, 0, 1, 2).contiguous()
    finally:
        model.train(was_training)
    return out


def toy_images(world: Any, split: str, images: Sequence[int] | Tensor) -> Tensor:
    """[n, 3, H, W] float images of a ToyWorld split at the given indices (order kept)."""
    idx = [int(i) for i in torch.as_tensor(images, dtype=torch.int64).reshape(-1)]
    if not idx or min(idx) < 0:
        raise ValueError(f"images = {idx}: expected one or more image indices >= 0")
    return torch.cat([world.batch(split, i, 1).images for i in idx])



@dataclass
class Gallery:
    """What a gallery of one concept shows: images [n, 3, H, W] (indices ``image_ids`` [n] of ``split``, ranked
    by ``scores`` [n]) and each model's heatmap on them, ``heatmaps``: {model: [n, G, G]} code values."""

    concept: int
    split: str
    image_ids: Tensor
    scores: Tensor
    images: Tensor
    heatmaps: dict[str, Tensor]

    @property
    def captions(self) -> list[str]:
        return [f"#{int(i)} ({float(s):.2f})" for i, s in zip(self.image_ids, self.scores, strict=True)]

    @property
    def peak(self) -> float:
        """The largest heatmap value of any model (for a colour scale shared between galleries)."""
        return max(float(m.max()) for m in self.heatmaps.values())


def gallery_images(world: Any, split: str, images: Sequence[int] | Tensor) -> Tensor:
    """[n, 3, H, W] images of ``split`` at the given indices from a ToyWorld (``.batch``) or from a loader
    ``world(split, ids)`` such as ``Experiment.images`` (an image folder's images, e.g. ImageNet-val)."""
    if hasattr(world, "batch"):
        return toy_images(world, split, images)
    if callable(world):
        return world(split, images)
    raise ValueError(f"world of type {type(world).__name__} is not valid; expected a ToyWorld or a loader "
                     "images(split, ids) -> [n, 3, H, W] such as Experiment.images")


def galleries(model: Any, acts: Any, world: Any, concepts: Any, split: str = "val", n_images: int = 6,
              pooling: str = "mean", quantile: float = 0.9, grid: int | None = None,
              progress: bool = False) -> dict[int, Gallery]:
    """{concept: Gallery}: one :func:`top_images` pass, then each concept's heatmaps. ``world``: where the
    images come from (see :func:`gallery_images`: a ToyWorld or ``Experiment.images``)."""
    top = top_images(model, acts, concepts, split, n_images, pooling, quantile, grid, progress=progress)
    out = {}
    for k in top.concepts.tolist():
        ids, scores = top.of(k)
        maps = concept_heatmaps(model, acts, ids, [k], split, grid)
        out[k] = Gallery(k, split, ids, scores, gallery_images(world, split, ids), {n: m[0] for n, m in maps.items()})
    return out


def most_universal(stats: Any, n: int = 10, min_entropy: float = 0.9) -> list[int]:
    """Concepts with firing entropy >= ``min_entropy`` ranked by their co-fire proportion in their *worst*
    model (min over models), highest first; ties by energy. The paper's "most universal" concepts."""
    order = concepts.concept_order(stats)
    worst = stats.cofire_proportion.nan_to_num(0.0).min(0).values[order]
    keep = stats.entropy.nan_to_num(-1.0)[order] >= min_entropy
    ranked = order[keep][torch.sort(-worst[keep], stable=True).indices]
    return ranked[:n].tolist()


def showcase_concepts(stats: Any, n_per_group: int = 2, min_entropy: float = 0.9,
                      max_entropy: float = 0.2) -> dict[str, list[int]]:
    """Concepts worth a gallery: ``{"most universal": [...], "pairwise a+b": [...], "unique to a": [...]}``
    (groups with no concept are left out). "most universal": :func:`most_universal`; pairwise and unique:
    ``usae.stats.concepts.pairwise_concepts`` (M >= 3) and ``unique_concepts``, most energetic first."""
    out: dict[str, list[int]] = {}
    uni = most_universal(stats, n_per_group, min_entropy)
    if uni:
        out["most universal"] = uni
    if stats.n_models >= 3:
        ids, pairs = concepts.pairwise_concepts(stats)
        for a, b in sorted({tuple(p) for p in pairs.tolist()}):
            chosen = ids[(pairs[:, 0] == a) & (pairs[:, 1] == b)][:n_per_group]
            out[f"pairwise {stats.names[a]}+{stats.names[b]}"] = chosen.tolist()
    ids, owner = concepts.unique_concepts(stats, max_entropy)
    for i, name in enumerate(stats.names):
        chosen = ids[owner == i][:n_per_group]
        if len(chosen):
            out[f"unique to {name}"] = chosen.tolist()
    return out
