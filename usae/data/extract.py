"""From images to the activation store: token grids, standardisation, extraction.

``extract_store`` runs several backbones over the same images, resamples every model's tokens to one common
grid (antialiased bilinear, e.g. DINOv2's 16x16 -> 14x14), standardises them per model and writes them
row-aligned into an :class:`~usae.data.store.ActivationStore`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from usae.config import ExtractConfig
from usae.data.sources import SourceLike, as_source
from usae.data.standardisation import STANDARDISE_MODES, Standardisation
from usae.data.store import ActivationStore, plain_json
from usae.data.store_writer import StoreWriter
from usae._checks import positive_int

__all__ = ["resample_grid", "fit_standardisation", "extract_store"]

# ------------------------------------------------------------------------------------------------ grids
def resample_grid(tokens: Tensor, grid: int) -> Tensor:
    """``tokens [B, h, w, D]`` -> ``[B, grid, grid, D]`` by bilinear interpolation with antialias
    (``F.interpolate``, ``align_corners=False``); the identity when ``h == w == grid``."""
    positive_int("grid", grid)
    if not isinstance(tokens, Tensor) or tokens.dim() != 4:
        raise ValueError(f"tokens of shape {getattr(tokens, 'shape', None)} are not valid; expected [B, h, w, D]")
    if tokens.shape[1] == grid and tokens.shape[2] == grid:
        return tokens
    maps = tokens.permute(0, 3, 1, 2)  # a channels-last view: no copy
    out = F.interpolate(maps.float(), size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
    return out.permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------ standardisation
class _Moments:
    """Streaming per-channel sums (float64) of tokens ``[..., D]``."""

    def __init__(self) -> None:
        self.count, self.sum, self.sumsq = 0, None, None

    def add(self, tokens: Tensor) -> None:
        flat = tokens.reshape(-1, tokens.shape[-1])
        s, q = flat.sum(0, dtype=torch.float64), flat.double().square().sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.count += flat.shape[0]

    def result(self, mode: str) -> Standardisation:
        if mode == "none":
            return Standardisation.identity()
        if not self.count:
            raise ValueError("no tokens were seen; cannot fit a standardisation")
        if mode == "scalar":
            n = self.count * self.sum.numel()
            mean = self.sum.sum() / n
            var = self.sumsq.sum() / n - mean * mean
        else:
            mean = self.sum / self.count
            var = self.sumsq / self.count - mean * mean
        return Standardisation(mean.float().cpu(), var.clamp_min(0).sqrt().float().cpu(), mode)


def _check_mode(mode: str) -> None:
    if mode not in STANDARDISE_MODES:
        raise ValueError(f"standardise mode = {mode!r} is not valid; expected one of {list(STANDARDISE_MODES)}")


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _images_of(loaded: Any) -> tuple[Tensor, Mapping[str, Any] | None]:
    if isinstance(loaded, tuple):
        return loaded[0], loaded[1]
    return loaded, None


def fit_standardisation(backbone: nn.Module, source: SourceLike, n_images: int, mode: str = "scalar",
                        batch_size: int = 64, progress: bool = False) -> Standardisation:
    """Mean and std of ``backbone``'s tokens over the first ``n_images`` images of ``source``, on the
    backbone's own grid (before resampling, like the paper), over all tokens and channels (``"scalar"``) or
    per channel (``"channel"``); population std. ``"none"`` gives the identity."""
    _check_mode(mode)
    src = as_source(source)
    if not isinstance(n_images, int) or not 0 < n_images <= src.n_images:
        raise ValueError(f"n_images = {n_images!r} is not valid; expected 1..{src.n_images}")
    if mode == "none":
        return Standardisation.identity()
    moments, device = _Moments(), _device_of(backbone)
    backbone.eval()
    with torch.no_grad():
        for start in tqdm(range(0, n_images, batch_size), desc="standardisation", disable=not progress):
            images, _ = _images_of(src.load(start, min(batch_size, n_images - start)))
            moments.add(backbone(images.to(device)))
    return moments.result(mode)


# ------------------------------------------------------------------------------------------------ extraction
def _label_rows(labels: Mapping[str, Any], count: int, tokens: int, split: str) -> dict[str, np.ndarray]:
    rows = {}
    for name, value in labels.items():
        arr = value.cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        if arr.shape[0] != count or arr.size != count * tokens:
            raise ValueError(f"split {split!r}: labels {name!r} of shape {arr.shape} do not match {count} images "
                             f"x {tokens} tokens of the store grid")
        rows[name] = arr.reshape(-1)
    return rows


def extract_store(backbones: Mapping[str, nn.Module], splits: Mapping[str, SourceLike], cfg: ExtractConfig,
                  out: str | Path, meta: Mapping[str, Any] | None = None,
                  labels: Mapping[str, Callable[[int, int], Mapping[str, Any]]] | None = None,
                  stats: Mapping[str, Standardisation] | None = None, progress: bool = True,
                  overwrite: bool = False, shard_bytes: int = 1 << 30,
                  work_dir: str | Path | None = None) -> ActivationStore:
    """Run every backbone over every split's images and write the store at ``out``.

    backbones: name -> module mapping images ``[B, 3, H, W]`` in [0, 1] to tokens ``[B, h, w, D]`` (a
    :class:`usae.data.zoo.Backbone`; prefix tokens already dropped). splits: name -> images (see ``as_source``);
    splits ``"train"``/``"val"`` use at most ``cfg.n_train_images``/``cfg.n_val_images`` images (the first
    ones), other splits all of theirs. labels: optional split -> ``fn(start, count)`` giving per-patch
    integer labels (a source may also return them with its images). stats: per-model standardisations to
    use (e.g. a training store's, for held-out splits); otherwise they are fitted (``cfg.standardise``) on
    the first ``cfg.n_stats_images`` images of split ``"train"``, on each backbone's own grid, without a
    second forward pass. Nothing appears at ``out`` until the store is complete.

    ``work_dir``: where the unfinished store is built (default: a hidden temp folder removed on failure). With
    a fixed folder the extraction resumes: after an interruption (exception, Ctrl-C, ``kill -9``) a rerun with
    the same folder and settings keeps every completed shard whose checksums still match, reuses the recorded
    standardisation and recomputes only the rest, giving the same store as an uninterrupted run. The folder is
    reused only when ``cfg``, ``meta``, the backbones' names and widths, the split sizes and ``shard_bytes``
    match; the backbones' weights are not checked, so give each set of weights its own folder or ``meta``.
    """
    if not backbones:
        raise ValueError("backbones is empty; expected at least one name -> backbone")
    if not splits:
        raise ValueError("splits is empty; expected at least one split name -> images")
    names = list(backbones)
    for name, bb in backbones.items():
        if not isinstance(getattr(bb, "dim", None), int):
            raise ValueError(f"backbone {name!r} has no integer .dim; expected a usae.data.zoo.Backbone")
    dims = {name: backbones[name].dim for name in names}
    meta = plain_json(dict(meta or {}), "meta")  # fail now, not after the extraction
    for split in (labels or {}):
        if split not in splits:
            raise ValueError(f"labels given for split {split!r}, which is not among splits {list(splits)}")
    sources = {s: as_source(src, cfg.image_size) for s, src in splits.items()}
    limits = {"train": cfg.n_train_images, "val": cfg.n_val_images}
    counts = {s: min(src.n_images, limits.get(s, src.n_images)) for s, src in sources.items()}
    mode = cfg.standardise
    if stats is not None:
        missing = sorted(set(names) - set(stats))
        if missing:
            raise ValueError(f"stats has no standardisation for backbones {missing}")
        stats = {n: stats[n] for n in names}
        n_stats = 0
    elif mode == "none":
        stats, n_stats = {n: Standardisation.identity() for n in names}, 0
    else:
        if "train" not in sources:
            raise ValueError(f"cannot fit standardisation: no 'train' split among {list(splits)}; add one, pass "
                             "stats=..., or use cfg.standardise='none'")
        n_stats = min(cfg.n_stats_images, counts["train"])
    order = sorted(sources, key=lambda s: s != "train")  # the statistics come from the first train images
    devices = {n: _device_of(backbones[n]) for n in names}
    for bb in backbones.values():
        bb.eval()
    tpi = cfg.grid * cfg.grid
    identity = {"cfg": cfg.to_dict(), "meta": meta, "counts": {s: counts[s] for s in order},
                "given_stats": None if stats is None else {n: stats[n].to_dict() for n in names}}
    bar = tqdm(total=sum(counts.values()), unit="img", desc="extract", disable=not progress)
    pool = ThreadPoolExecutor(1)  # loads the next batch while the backbones run
    try:
        with StoreWriter(out, dims, cfg.grid, cfg.dtype, overwrite=overwrite, shard_bytes=shard_bytes,
                         work_dir=work_dir, identity=identity) as writer:
            if stats is not None:
                writer.record_stats(stats)
            elif writer.resumed_stats is not None:  # fitted by the interrupted run: the same numbers
                stats, n_stats = writer.resumed_stats, 0
            else:
                writer.discard_done()
            raw: dict[str, list[Tensor]] = {n: [] for n in names}
            moments = {n: _Moments() for n in names}
            for split in order:
                writer.add_split(split, counts[split])
                src, bs = sources[split], cfg.batch_size
                # batches never straddle a shard, so a shard kept from an interrupted run is skipped whole
                todo = []
                for first, stop, done in writer.shards(split):
                    if done:
                        bar.update(stop - first)
                    else:
                        todo += [(b, min(bs, stop - b)) for b in range(first, stop, bs)]
                if not todo:
                    continue
                pending = pool.submit(src.load, *todo[0])
                for bi, (start, count) in enumerate(todo):
                    images, batch_labels = _images_of(pending.result())
                    if bi + 1 < len(todo):
                        pending = pool.submit(src.load, *todo[bi + 1])
                    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] != count:
                        raise ValueError(f"split {split!r}: load({start}, {count}) returned "
                                         f"{getattr(images, 'shape', type(images))}; expected [{count}, 3, H, W]")
                    if batch_labels is None and labels and split in labels:
                        batch_labels = labels[split](start, count)
                    if batch_labels:
                        for fac, vals in _label_rows(batch_labels, count, tpi, split).items():
                            writer.write_labels(split, fac, start * tpi, vals)
                    in_stats = split == "train" and start < n_stats
                    on_device: dict[torch.device, Tensor] = {}
                    for name in names:
                        dev = devices[name]
                        if dev not in on_device:
                            on_device[dev] = images.to(dev, non_blocking=True)
                        with torch.no_grad():
                            tokens = backbones[name](on_device[dev])
                        if tokens.dim() != 4 or tokens.shape[0] != count or tokens.shape[3] != dims[name]:
                            raise ValueError(f"backbone {name!r} returned {tuple(tokens.shape)}; expected "
                                             f"[{count}, h, w, {dims[name]}]")
                        if in_stats:
                            keep = min(count, n_stats - start)
                            moments[name].add(tokens[:keep])
                        tokens = resample_grid(tokens, cfg.grid)
                        if in_stats:  # hold raw rows until the statistics are known
                            raw[name].append(tokens.reshape(-1, dims[name]).to("cpu", torch.float32, copy=True))
                            continue
                        _write_tokens(writer, split, name, start * tpi, stats[name].apply(tokens), count, start)
                    if in_stats and start + count >= n_stats:
                        stats = {n: moments[n].result(mode) for n in names}
                        writer.record_stats(stats)
                        for name in names:
                            rows = torch.cat(raw[name])
                            raw[name] = []
                            _write_tokens(writer, split, name, 0, stats[name].apply(rows), len(rows) // tpi, 0)
                    bar.update(count)
            store = writer.finish(stats, meta)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return store


def _write_tokens(writer: StoreWriter, split: str, name: str, row0: int, tokens: Tensor, count: int,
                  start: int) -> None:
    """Convert to the store's dtype, check that every value is finite, write."""
    rows = tokens.reshape(-1, tokens.shape[-1]).to(torch.float16 if writer.dtype == np.float16 else torch.float32)
    if not bool(torch.isfinite(rows).all()):
        what = ("overflow float16 (|x| > 65504); use dtype='float32'" if bool(torch.isfinite(tokens).all())
                else "are NaN or Inf; check the backbone's weights and the input images")
        raise ValueError(f"activations of backbone {name!r} on split {split!r}, images {start}..{start + count - 1} "
                         f"{what}")
    writer.write(split, name, row0, rows)
