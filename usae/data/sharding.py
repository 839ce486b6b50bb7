"""Sharding a training source over data-parallel ranks (used by ``usae.train.distributed.DistributedTrainer``).

Each global batch of ``batch_size`` rows is cut into ``world`` contiguous slices and rank r reads only its
slice: a store's rows are gathered from its memory maps following exactly the plan of
``ActivationStore.batches`` (``usae.data.batches.epoch_plan``), a dict is indexed in the order of
``aligned_batches``, a list of batches is sliced. An :class:`usae.data.online.OnlineSource` is sharded by image
blocks instead (each rank runs the backbones on its own blocks, in batches of ``batch_size / world`` rows).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from usae.data.batches import aligned_batches, default_window_rows, epoch_plan
from usae.data.online import OnlineSource

__all__ = ["shard_source"]


class _DictShard:
    """Rank r's slices of the global batches of a dict {name: [N, d]} (same order as ``aligned_batches``)."""

    def __init__(self, data: Mapping[str, Tensor], rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                models: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
        names = list(self.data if models is None else models)
        total = len(torch.as_tensor(self.data[names[0]]))
        local = batch_size // self.world
        for b in aligned_batches({"_": torch.arange(total)}, ["_"], batch_size, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last):
            ids = b["_"][self.rank * local:(self.rank + 1) * local]
            yield {n: torch.as_tensor(self.data[n])[ids] for n in names}


class _StoreShard:
    """Rank r's slices of ``ActivationStore.batches`` (same plan), reading only those rows."""

    def __init__(self, store: Any, rank: int, world: int, block_rows: int = 2048) -> None:
        self.store, self.rank, self.world, self.block_rows = store, rank, world, block_rows
        self._maps: dict[tuple[str, str], list[np.ndarray]] = {}

    def _read(self, split: str, model: str, ids: Tensor) -> Tensor:
        shards = self.store.manifest["splits"][split]["shards"]
        if (split, model) not in self._maps:
            self._maps[(split, model)] = [np.load(self.store.path / sh["files"][model], mmap_mode="r")
                                          for sh in shards]
        bounds = np.cumsum([0] + [sh["rows"] for sh in shards])
        order = np.argsort(ids.numpy(), kind="stable")
        rows = ids.numpy()[order]
        out = np.empty((len(rows), self.store.dims[model]), dtype=self.store.dtype)
        which = np.searchsorted(bounds, rows, side="right") - 1
        for k in np.unique(which):
            hit = which == k
            out[hit] = self._maps[(split, model)][k][rows[hit] - bounds[k]]
        result = np.empty_like(out)
        result[order] = out
        return torch.from_numpy(result).float()

    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                models: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
        names = list(self.store.models if models is None else models)
        shards = self.store.manifest["splits"][split]["shards"]
        bounds = np.cumsum([0] + [sh["rows"] for sh in shards])
        blocks = [(a, min(a + self.block_rows, int(hi))) for lo, hi in zip(bounds[:-1], bounds[1:])
                  for a in range(int(lo), int(hi), self.block_rows)]
        local = batch_size // self.world
        for window in epoch_plan(blocks, batch_size, shuffle=shuffle, seed=seed,
                                 window_rows=default_window_rows(batch_size), drop_last=drop_last):
            for positions in window.batches:
                ids = window.ids[positions[self.rank * local:(self.rank + 1) * local]]
                yield {n: self._read(split, n, ids) for n in names}


class _OnlineShard:
    """Rank r's image blocks of an OnlineSource, in batches of batch_size / world rows."""

    def __init__(self, source: OnlineSource, rank: int, world: int) -> None:
        self.source, self.rank, self.world = source, rank, world

    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                models: Sequence[str] | None = None) -> Iterator[Mapping[str, Tensor]]:
        return self.source.batches(split, batch_size // self.world, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                   models=models, shard=(self.rank, self.world))


def _slices(batches: Any, rank: int, world: int) -> Iterator[dict[str, Tensor]]:
    for batch in batches:
        n = len(next(iter(batch.values())))
        if n % world:
            raise ValueError(f"a batch of {n} rows cannot be split evenly over {world} ranks")
        local = n // world
        yield {k: v[rank * local:(rank + 1) * local] for k, v in batch.items()}


class _IterShard:
    """Rank r's slices of every batch of a re-iterable collection of batch dicts."""

    def __init__(self, batches: Any, rank: int, world: int) -> None:
        self.batches_, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return _slices(self.batches_, self.rank, self.world)


def shard_source(source: Any, rank: int, world: int) -> Any:
    """What rank ``rank`` of ``world`` reads of a training source (store, dict, OnlineSource or batches)."""
    from usae.data.store import ActivationStore

    if isinstance(source, OnlineSource):
        return _OnlineShard(source, rank, world)
    if isinstance(source, ActivationStore):
        return _StoreShard(source, rank, world)
    if isinstance(source, Mapping):
        return _DictShard(source, rank, world)
    if hasattr(source, "batches"):
        raise ValueError(f"cannot shard a source of type {type(source).__name__}; expected an ActivationStore, "
                         "an OnlineSource, a dict name -> [N, d] or an iterable of batch dicts")
    return _slices(source, rank, world) if iter(source) is source else _IterShard(source, rank, world)
