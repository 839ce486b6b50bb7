"""Online training data: images streamed through every backbone into aligned, standardised token batches.

The paper trains at full scale without an activation cache: each batch of images runs through all backbones
(frozen, eval mode, no gradients, optionally under bf16 autocast), prefix tokens are dropped and every grid is
resampled to the common one (``usae.data.zoo.Backbone`` and ``usae.data.extract.resample_grid``), and each model's tokens
are standardised. :class:`OnlineSource` does that and looks like an ``ActivationStore`` to the rest of the
library: ``Trainer.fit``, ``r2_matrix``, ``firing_stats``, ``top_images`` and ``galleries`` accept it.

Batches follow :func:`usae.data.batches.epoch_plan`, which is exactly the store's shuffling (``ActivationStore.batches``) with
blocks of ``block_images`` whole images: the blocks are visited in a seeded random order, about
``window_rows`` rows at a time are shuffled together with the rows left over from the previous window. So an
online source gives the same batches as a store extracted from the same images (one shard, ``block_rows =
block_images * grid**2``). Batches are *lazy*: the backbones run when a window's first batch is read, so the
batches a resumed ``Trainer`` skips cost only the index arithmetic (a window whose start is skipped recomputes
the few blocks its carried-over rows came from). Memory: one window of tokens plus the carried rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping as MappingABC
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from usae.data.batches import Window, epoch_plan
from usae.data.extract import fit_standardisation, resample_grid
from usae.data.sources import ImageSource, as_source
from usae.data.standardisation import Standardisation
from usae._checks import positive_int

__all__ = ["OnlineSource"]


class _Autocast(nn.Module):
    """A backbone whose forward runs under ``torch.autocast(dtype)``; returns float32 tokens."""

    def __init__(self, backbone: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.backbone, self.dtype = backbone, dtype
        self.dim = getattr(backbone, "dim", None)

    def forward(self, images: Tensor) -> Tensor:
        if self.dtype is None:
            return self.backbone(images)
        with torch.autocast(images.device.type, dtype=self.dtype):
            return self.backbone(images).float()


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


class OnlineSource:
    """Aligned, standardised token batches computed from images on the fly (an ``ActivationStore`` look-alike).

    backbones: name -> module mapping images ``[B, 3, H, W]`` in [0, 1] to tokens ``[B, h, w, D]`` with an int
    ``.dim`` (a ``usae.data.zoo.Backbone``). images: split -> images (anything ``usae.data.sources.as_source`` reads), or
    one source for split ``"train"``. grid: the common token grid side. stats: per-model standardisations
    (e.g. a store's ``.stats``); by default fitted (``standardise``) on the first ``n_stats_images`` images of
    ``stats_split`` on each backbone's own grid, as ``extract_store`` does. block_images: images per backbone
    forward and per shuffle block. autocast: e.g. ``torch.bfloat16`` for the backbones (None: float32).
    ``meter`` counts images, tokens and seconds spent making tokens (``throughput()``: tokens/s).
    """

    def __init__(self, backbones: Mapping[str, nn.Module], images: Any, grid: int, *,
                 stats: Mapping[str, Standardisation] | None = None, standardise: str = "scalar",
                 n_stats_images: int = 1000, stats_split: str = "train", block_images: int = 32,
                 window_rows: int | None = None, image_size: int | None = None,
                 autocast: torch.dtype | None = None, progress: bool = True) -> None:
        if not isinstance(backbones, Mapping) or not backbones:
            raise ValueError("backbones is empty or not a mapping; expected name -> backbone")
        for name, bb in backbones.items():
            if not isinstance(getattr(bb, "dim", None), int):
                raise ValueError(f"backbone {name!r} has no integer .dim; expected a usae.data.zoo.Backbone")
        positive_int("grid", grid)
        positive_int("block_images", block_images)
        if window_rows is not None:
            positive_int("window_rows", window_rows)
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast = {autocast!r} is not valid; expected None, torch.bfloat16 or torch.float16")
        splits = images if isinstance(images, Mapping) else {"train": images}
        if not splits:
            raise ValueError("images is empty; expected split name -> images")
        self.sources: dict[str, ImageSource] = {s: as_source(src, image_size) for s, src in splits.items()}
        self.models: tuple[str, ...] = tuple(backbones)
        self.dims = {n: int(backbones[n].dim) for n in self.models}
        self.grid, self.tokens_per_image = grid, grid * grid
        self.block_images, self.window_rows, self.progress = block_images, window_rows, progress
        self.backbones = {n: _Autocast(bb.eval(), autocast) for n, bb in backbones.items()}
        self.device = _device_of(next(iter(backbones.values())))
        self.meter = {"images": 0, "tokens": 0, "seconds": 0.0, "peak_rows": 0}
        self._pool = ThreadPoolExecutor(1)  # loads the next block's images while the backbones run
        if stats is None:
            if stats_split not in self.sources:
                raise ValueError(f"cannot fit standardisation: no split {stats_split!r} among {list(self.sources)}; "
                                 "pass stats=... (e.g. a store's .stats or the model's)")
            positive_int("n_stats_images", n_stats_images)
            n = min(n_stats_images, self.sources[stats_split].n_images)
            stats = {name: fit_standardisation(self.backbones[name], self.sources[stats_split], n, standardise,
                                               batch_size=block_images) for name in self.models}
        missing = [n for n in self.models if n not in stats]
        if missing:
            raise ValueError(f"stats has no standardisation for backbones {missing}")
        self.stats: dict[str, Standardisation] = {n: stats[n] for n in self.models}

    @classmethod
    def from_experiment(cls, experiment: Any, **overrides: Any) -> "OnlineSource":
        """The source of an ``Experiment``: its backbones, image splits, grid and standardisation settings."""
        cfg = experiment.config.extract
        kwargs = dict(grid=cfg.grid, standardise=cfg.standardise, n_stats_images=cfg.n_stats_images,
                      block_images=cfg.batch_size, image_size=cfg.image_size, progress=experiment.progress)
        kwargs.update(overrides)
        return cls(experiment.backbones(), experiment.image_sources(), **kwargs)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}: {src.n_images} images" for s, src in self.sources.items())
        return f"OnlineSource(models={list(self.models)}, dims={self.dims}, grid={self.grid}, {sizes})"

    # -- sizes -------------------------------------------------------------------------------------------------
    def _source(self, split: str) -> ImageSource:
        if split not in self.sources:
            raise ValueError(f"unknown split {split!r}; this source has {list(self.sources)}")
        return self.sources[split]

    def n_images(self, split: str) -> int:
        return self._source(split).n_images

    def n_rows(self, split: str) -> int:
        return self.n_images(split) * self.tokens_per_image

    def throughput(self) -> float:
        """Tokens per second made so far (per model; backbones + loading + standardisation)."""
        return self.meter["tokens"] / self.meter["seconds"] if self.meter["seconds"] else float("nan")

    # -- tokens ------------------------------------------------------------------------------------------------
    def _load(self, split: str, start: int, count: int) -> Tensor:
        loaded = self._source(split).load(start, count)
        images = loaded[0] if isinstance(loaded, tuple) else loaded
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] != count:
            raise ValueError(f"split {split!r}: load({start}, {count}) returned "
                             f"{getattr(images, 'shape', type(images))}; expected [{count}, 3, H, W]")
        return images

    @torch.no_grad()
    def _tokens(self, images: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """images [B, 3, H, W] -> {name: standardised tokens [B * grid**2, d] float32} on ``self.device``."""
        out, count = {}, images.shape[0]
        for name in names:
            bb = self.backbones[name]
            tokens = bb(images.to(_device_of(bb.backbone), non_blocking=True))
            if tokens.dim() != 4 or tokens.shape[0] != count or tokens.shape[3] != self.dims[name]:
                raise ValueError(f"backbone {name!r} returned {tuple(tokens.shape)}; expected "
                                 f"[{count}, h, w, {self.dims[name]}]")
            tokens = self.stats[name].apply(resample_grid(tokens.float(), self.grid))
            out[name] = tokens.reshape(-1, self.dims[name]).to(self.device)
        return out

    def _blocks(self, split: str) -> list[tuple[int, int]]:
        t, n, b = self.tokens_per_image, self.n_images(split), self.block_images
        return [(s * t, min(s + b, n) * t) for s in range(0, n, b)]

    def _block_tokens(self, split: str, blocks: Sequence[tuple[int, int]], names: Sequence[str],
                      bar: Any = None) -> Iterator[dict[str, Tensor]]:
        """Tokens of whole-image row blocks, in order (the next block's images load in a thread)."""
        t = self.tokens_per_image
        spans = [(a // t, (b - a) // t) for a, b in blocks]
        pending = self._pool.submit(self._load, split, *spans[0]) if spans else None
        for k, (start, count) in enumerate(spans):
            began = time.perf_counter()
            images = pending.result()
            if k + 1 < len(spans):
                pending = self._pool.submit(self._load, split, *spans[k + 1])
            tokens = self._tokens(images, names)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.meter["seconds"] += time.perf_counter() - began
            self.meter["images"] += count
            self.meter["tokens"] += count * t
            if bar is not None:
                bar.update(count * t)
                bar.set_postfix(tok_s=f"{self.throughput():.3g}", refresh=False)
            yield tokens

    def _gather(self, split: str, ids: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """{name: [len(ids), d]} rows ``ids`` in that order, computed from the blocks that hold them."""
        if len(ids) == 0:
            return {n: torch.empty(0, self.dims[n], device=self.device) for n in names}
        per = self.block_images * self.tokens_per_image
        everything = self._blocks(split)
        blocks = [everything[k] for k in torch.unique(ids // per).tolist()]
        parts = list(self._block_tokens(split, blocks, names))
        starts = torch.tensor([a for a, _ in blocks], dtype=torch.int64)
        offsets = torch.cumsum(torch.tensor([0] + [b - a for a, b in blocks[:-1]]), 0)
        slot = torch.searchsorted(starts, ids, right=True) - 1
        where = offsets[slot] + ids - starts[slot]
        return {n: torch.cat([p[n] for p in parts]).index_select(0, where.to(self.device)) for n in names}

    def rows(self, split: str, model: str, start: int, stop: int) -> Tensor:
        """Rows ``start .. stop`` of ``model`` as float32 ``[stop - start, d]`` (store order)."""
        if model not in self.dims:
            raise ValueError(f"unknown model {model!r}; this source has {list(self.models)}")
        n = self.n_rows(split)
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
            raise ValueError(f"rows {start!r}..{stop!r} are not valid for split {split!r}; expected "
                             f"0 <= start <= stop <= {n}")
        return self._gather(split, torch.arange(start, stop), [model])[model].cpu()

    # -- batches -----------------------------------------------------------------------------------------------
    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                models: Sequence[str] | None = None, shard: tuple[int, int] | None = None
                ) -> Iterator[Mapping[str, Tensor]]:
        """One epoch of aligned batches ``{model: [batch_size, d] float32}`` (lazy mappings; see the module
        docstring), the same as ``ActivationStore.batches`` with ``block_rows = block_images * grid**2``.
        ``shard=(rank, world)``: this rank's share of the blocks, batches of ``batch_size`` rows from them."""
        names = tuple(self.models if models is None else models)
        unknown = [n for n in names if n not in self.dims]
        if not names or unknown:
            raise ValueError(f"models = {list(names)!r} is not valid; expected names among {list(self.models)}")
        positive_int("batch_size", batch_size)
        world = 1 if shard is None else shard[1]
        total = self.n_rows(split) // world
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"online {split}", leave=False,
                   disable=not self.progress)
        carry = None
        try:
            for window in epoch_plan(self._blocks(split), batch_size, shuffle=shuffle, seed=seed,
                                     window_rows=self.window_rows, drop_last=drop_last, shard=shard):
                lazy = _LazyWindow(self, split, window, names, carry, bar)
                for positions in window.batches:
                    yield _LazyBatch(lazy, positions)
                carry = lazy.carried()
        finally:
            bar.close()


class _LazyWindow:
    """A window whose tokens are computed on first access; knows the carried rows' tokens if it had them."""

    def __init__(self, source: OnlineSource, split: str, window: Window, names: Sequence[str],
                 carry: dict[str, Tensor] | None, bar: Any) -> None:
        self.source, self.split, self.window, self.names = source, split, window, names
        self.carry, self.bar = carry, bar
        self.acts: dict[str, Tensor] | None = None

    def materialise(self) -> dict[str, Tensor]:
        if self.acts is None:
            w, src = self.window, self.source
            head = self.carry if self.carry is not None else src._gather(self.split, w.ids[:w.n_carry], self.names)
            self.acts = {n: torch.empty(len(w.ids), src.dims[n], device=src.device) for n in self.names}
            for n in self.names:
                self.acts[n][:w.n_carry] = head[n]
            self.carry = head = None
            pos = w.n_carry
            for part in src._block_tokens(self.split, w.blocks, self.names, self.bar):  # filled block by block
                rows = len(part[self.names[0]])
                for n in self.names:
                    self.acts[n][pos:pos + rows] = part[n]
                pos += rows
            src.meter["peak_rows"] = max(src.meter["peak_rows"], len(w.ids))
        return self.acts

    def carried(self) -> dict[str, Tensor] | None:
        """Tokens of the rows this window hands on (None when it was never computed: they are recomputed)."""
        if self.acts is None:
            return None
        rest = self.window.rest
        return {n: a.index_select(0, rest.to(a.device)) for n, a in self.acts.items()}


class _LazyBatch(MappingABC):
    """``{name: [B, d]}`` whose tensors are gathered from the window when first read."""

    def __init__(self, window: _LazyWindow, positions: Tensor) -> None:
        self._window, self._positions = window, positions

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._window.names:
            raise KeyError(name)
        acts = self._window.materialise()[name]
        return acts.index_select(0, self._positions.to(acts.device))

    def __iter__(self) -> Iterator[str]:
        return iter(self._window.names)

    def __len__(self) -> int:
        return len(self._window.names)
