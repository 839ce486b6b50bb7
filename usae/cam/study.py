"""Measuring CAM images against the data: exemplars, image scores, concept ranks, one study per concept.

An image's *score* for concept k through model i is the token reduction (mean or max, as in the objective)
of the pre-TopK activation of k over the image's tokens. The same number is computed for dataset images
from the activation store (standardised rows on the common grid) and for CAM images through the backbone
(resampled to the same grid). So "the CAM image activates k more than its top-10 exemplars" compares like
with like. An image's *rank* of k is k's place (1 = first) among all m concepts of the image's mean sparse
code (post-TopK, what the USAE says the image contains).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from usae.cam.objectives import concept_head, reduce_tokens
from usae.cam.render import CamResult, CamSettings, consensus, coordinated
from usae.cam.spectrum import Spectrum, folder_spectrum, load_spectrum

__all__ = ["Exemplars", "top_exemplars", "image_scores", "concept_rank", "ConceptStudy", "study_concept",
           "experiment_images", "experiment_spectrum", "choose_concepts", "Chosen"]


@dataclass
class Exemplars:
    """The ``n`` dataset images of ``split`` where concept ``k`` of model ``name`` scores highest.

    image_ids: [n] int64; scores: [n] (token reduction of the pre-TopK activation); maps: [n, G, G] the
    per-token pre-TopK activation (for heatmaps); dataset_mean: the mean score over all images of the split.
    """

    name: str
    k: int
    split: str
    reduce: str
    image_ids: Tensor
    scores: Tensor
    maps: Tensor
    dataset_mean: float

    def mean_score(self, top: int = 10) -> float:
        return float(self.scores[:top].mean())


def top_exemplars(sae: Any, store: Any, name: str, k: int, split: str = "val", n: int = 10, reduce: str = "mean",
                  batch_images: int = 512) -> Exemplars:
    """Stream ``split``'s rows of model ``name`` through concept ``k``'s head and keep the top ``n`` images."""
    weight, bias = concept_head(sae, name, k, standardised=True)
    if split not in store.splits:
        raise ValueError(f"split = {split!r} is not valid; the store has {list(store.splits)}")
    tpi, grid = store.tokens_per_image, store.grid
    n_images = store.n_rows(split) // tpi
    if not isinstance(n, int) or not 1 <= n <= n_images:
        raise ValueError(f"n = {n!r} is not valid; expected 1 <= n <= {n_images} (images in split {split!r})")
    scores, maps = [], []
    for start in range(0, n_images, batch_images):
        stop = min(n_images, start + batch_images)
        rows = store.rows(split, name, start * tpi, stop * tpi).to(weight.device, torch.float32)  # the SAE's device
        acts = (rows @ weight + bias).view(stop - start, grid, grid)
        scores.append(reduce_tokens(acts, reduce).cpu())
        maps.append(acts.cpu())
    all_scores, all_maps = torch.cat(scores), torch.cat(maps)
    top = torch.sort(-all_scores, stable=True).indices[:n]
    return Exemplars(name, k, split, reduce, top, all_scores[top], all_maps[top], float(all_scores.mean()))


def image_scores(backbone: Any, sae: Any, name: str, images: Tensor, reduce: str = "mean",
                 grid: int | None = None) -> tuple[Tensor, Tensor]:
    """Scores of every concept for ``images [N, 3, H, W]`` (pixel units) through model ``name``.

    Returns ``(pre [N, m], code [N, m])``: the token reduction of the pre-TopK activations, and the mean
    over tokens of the sparse code. ``grid``: resample tokens to this side first (the store's grid).
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or \
            images.shape[-1] != images.shape[-2]:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape} are not valid; expected square images [N, 3, S, S]")
    sae.index(name)
    with torch.no_grad():
        device = next(iter(backbone.parameters()), images).device  # run where the backbone lives (e.g. CUDA)
        tokens = backbone(images.float().to(device))
        if grid is not None:
            from usae.data.extract import resample_grid

            tokens = resample_grid(tokens, grid)
        n, d = tokens.shape[0], tokens.shape[-1]
        x = sae.standardise(name, tokens.reshape(-1, d))
        pre = sae.encode_pre(name, x).view(n, -1, sae.n_latents)         # [N, T, m]
        code = sae.encode(name, x)
        dense = torch.zeros(n * pre.shape[1], sae.n_latents, device=code.values.device).scatter_(
            1, code.indices, code.values.float())
        return reduce_tokens(pre.transpose(1, 2).reshape(n * sae.n_latents, -1), reduce).view(n, -1).cpu(), \
            dense.view(n, -1, sae.n_latents).mean(1).cpu()


def concept_rank(scores: Tensor, k: int) -> Tensor:
    """Rank (1 = highest) of concept ``k`` in each row of ``scores [N, m]``; ties count against k."""
    return (scores >= scores[:, k:k + 1]).sum(1)


def experiment_images(exp: Any) -> Callable[[str, Sequence[int]], Tensor]:
    """``load(split, ids) -> [n, 3, H, W]``: dataset images of an ``Experiment`` by index."""
    if exp.is_toy:
        return lambda split, ids: torch.cat([exp.world.batch(split, int(i), 1).images for i in ids])
    sources = exp.image_sources()
    return lambda split, ids: torch.cat([_images(sources[split].load(int(i), 1)) for i in ids])


def experiment_spectrum(exp: Any, size: int = 224, n_images: int = 1024) -> Spectrum:
    """The spectrum for an ``Experiment``'s images: the committed toy-world one, or for an image folder one
    computed from ``n_images`` of its images at ``size`` px and cached in the runs folder."""
    if exp.is_toy:
        return load_spectrum()
    import hashlib

    tag = hashlib.sha256(f"{exp.config.source}|{size}|{n_images}".encode()).hexdigest()[:10]
    path = exp.runs / f"spectrum-{tag}.npz"
    if not path.is_file():
        folder_spectrum(exp.config.source, size, n_images, progress=exp.progress).save(path)
    return load_spectrum(path)


def _images(loaded: Any) -> Tensor:
    return loaded[0] if isinstance(loaded, tuple) else loaded


@dataclass
class ConceptStudy:
    """CAM of one concept: exemplars, one image per model, the consensus image, and their measurements.

    ``rows``: per model ``{"model", "CAM score", "top-10 mean", "dataset mean", "ratio", "rank in code",
    "rank in pre-TopK", "consensus score"}`` (NaN without a consensus image).
    """

    k: int
    label: str
    exemplars: dict[str, Exemplars]
    exemplar_images: dict[str, Tensor]
    cams: dict[str, CamResult]
    consensus: CamResult | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def seconds(self) -> float:
        return sum(r.seconds for r in self.cams.values()) + (self.consensus.seconds if self.consensus else 0.0)


def study_concept(backbones: Mapping[str, Any], sae: Any, store: Any, k: int, settings: CamSettings,
                  load_images: Callable[[str, Sequence[int]], Tensor], label: str = "", split: str = "val",
                  n_exemplars: int = 10, show: int = 5, with_consensus: bool = True, seed: int = 0,
                  progress: bool = True, spectrum: Spectrum | None = None) -> ConceptStudy:
    """Exemplars of ``k`` per model, CAM images per model (and the consensus image), scored against them."""
    names = list(sae.names)
    exemplars = {n: top_exemplars(sae, store, n, k, split, n_exemplars, settings.reduce) for n in names}
    shown = {n: load_images(split, exemplars[n].image_ids[:show].tolist()) for n in names}
    cams = coordinated(backbones, sae, k, settings, names, seed, progress, spectrum)
    joint = consensus(backbones, sae, k, settings, names, seed, progress, spectrum) if with_consensus else None
    rows = []
    for n in names:
        pre, code = image_scores(backbones[n], sae, n, cams[n].images, settings.reduce, store.grid)
        row = {"model": n, "CAM score": float(pre[0, k]), "top-10 mean": exemplars[n].mean_score(10),
               "dataset mean": exemplars[n].dataset_mean}
        row["ratio"] = row["CAM score"] / row["top-10 mean"] if row["top-10 mean"] > 0 else float("nan")
        row["rank in code"] = int(concept_rank(code, k)[0])
        row["rank in pre-TopK"] = int(concept_rank(pre, k)[0])
        row["consensus score"] = float("nan") if joint is None else \
            float(image_scores(backbones[n], sae, n, joint.images, settings.reduce, store.grid)[0][0, k])
        rows.append(row)
    return ConceptStudy(k, label, exemplars, shown, cams, joint, rows)


class Chosen(NamedTuple):
    """A concept picked for study: its index, ``kind`` ("universal" or "unique"), a readable label, and for a
    unique concept the model it belongs to."""

    k: int
    kind: str
    label: str
    model: str | None = None


def choose_concepts(stats: Any, n_universal: int = 3, n_unique: int = 1) -> list[Chosen]:
    """Concepts to study.

    Universal: the ``n_universal`` most energetic concepts of ``usae.stats.concepts.universal_concepts`` (entropy
    >= 0.9 and co-fire proportion >= 0.5 in every model). If fewer pass, the concepts with the highest
    *minimum* co-fire proportion over models fill the list (labelled with that value). Model-unique: per
    model, its ``n_unique`` most energetic ``unique_concepts`` (entropy <= 0.2). If a model has none, its
    lowest-entropy concepts (those it fires most of) stand in, labelled with their entropy.
    """
    from usae.stats.concepts import universal_concepts

    chosen: dict[int, Chosen] = {}
    for k in universal_concepts(stats).tolist()[:n_universal]:
        chosen[int(k)] = Chosen(int(k), "universal", "universal")
    if len(chosen) < n_universal:
        min_cfp = stats.cofire_proportion.nan_to_num(0.0).min(0).values
        order = sorted(range(stats.n_latents), key=lambda k: (-float(min_cfp[k]), -float(stats.aggregated_energy[k])))
        for k in order:
            if len(chosen) >= n_universal:
                break
            chosen.setdefault(k, Chosen(k, "universal", f"most co-firing (min CFP {float(min_cfp[k]):.2f})"))
    entropy = stats.entropy.nan_to_num(float("inf"))
    owner = stats.fire_distribution.nan_to_num(0.0).argmax(0)
    for i, name in enumerate(stats.names):
        mine = [k for k in range(stats.n_latents) if int(owner[k]) == i and k not in chosen and
                float(entropy[k]) < float("inf")]
        strict = sorted((k for k in mine if float(entropy[k]) <= 0.2), key=lambda k: -float(stats.aggregated_energy[k]))
        loose = sorted(mine, key=lambda k: (float(entropy[k]), -float(stats.aggregated_energy[k])))
        for k in (strict or loose)[:n_unique]:
            chosen[k] = Chosen(k, "unique", f"unique to {name}" if strict else
                               f"most {name}-specific (entropy {float(entropy[k]):.2f})", name)
    return list(chosen.values())
