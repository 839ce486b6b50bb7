"""The one shuffle plan of an epoch, and aligned batches from any row source.

Every source of aligned rows (an ``ActivationStore``, an ``OnlineSource``, rows in memory) makes its batches
from :func:`epoch_plan`: the rows are cut into blocks of contiguous rows, the blocks are visited in a seeded
random order, about ``window_rows`` rows at a time are read and shuffled together with the rows left over
from the previous window (bounded memory, the same batches for the same seed). Rows in memory are one block
and one window, so their plan is a plain seeded permutation. :func:`aligned_batches` gives the batches of any
source to the trainer and the evaluators.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from usae._checks import positive_int

__all__ = ["Window", "aligned_batches", "default_window_rows", "epoch_plan"]


def default_window_rows(batch_size: int) -> int:
    """The store's default shuffle window: ``max(65536, 4 * batch_size)`` rows."""
    return max(65536, 4 * batch_size)


@dataclass
class Window:
    """One shuffle window of an epoch, in global row ids (row = image * tokens_per_image + token).

    ids: [n] the window's rows, the ``n_carry`` rows carried from the previous window first, then the rows of
    ``blocks`` ([(first row, end row)], in order); batches: positions into ``ids``, one [B] tensor per batch;
    rest: positions of the rows carried on to the next window.
    """

    ids: Tensor
    n_carry: int
    blocks: list[tuple[int, int]]
    batches: list[Tensor]
    rest: Tensor


def epoch_plan(blocks: Sequence[tuple[int, int]], batch_size: int, *, shuffle: bool = True, seed: int = 0,
               window_rows: int | None = None, drop_last: bool = True,
               shard: tuple[int, int] | None = None) -> Iterator[Window]:
    """The windows of one epoch over row ``blocks`` [(start, stop)], as ``ActivationStore.batches`` reads them.

    ``shard=(rank, world)``: after the seeded block order, rank r keeps blocks r, r + world, ... and makes
    batches of ``batch_size`` rows from them alone (shuffled with ``seed + rank``); every rank yields the same
    number of batches (the smallest rank's count), so collective operations stay in step.
    """
    positive_int("batch_size", batch_size)
    window_rows = default_window_rows(batch_size) if window_rows is None else window_rows
    if not isinstance(window_rows, int) or window_rows < batch_size:
        raise ValueError(f"window_rows = {window_rows!r} is not valid; expected an int >= batch_size={batch_size}")
    blocks = [(int(a), int(b)) for a, b in blocks]
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(blocks))
        blocks = [blocks[i] for i in order]
    limit = None
    if shard is not None:
        rank, world = shard
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"shard = {shard!r} is not valid; expected (rank, world) with 0 <= rank < world")
        if not drop_last:
            raise ValueError("a sharded epoch needs drop_last=True (every rank must make the same number of batches)")
        rows = [sum(b - a for a, b in blocks[r::world]) for r in range(world)]
        limit = min(rows) // batch_size
        blocks, seed = blocks[rank::world], seed + rank
    gen = torch.Generator().manual_seed(seed)
    carry, made, i = torch.empty(0, dtype=torch.int64), 0, 0
    while i < len(blocks) and (limit is None or made < limit):
        chosen, total = [], 0
        while i < len(blocks) and (total < window_rows or not chosen):
            chosen.append(blocks[i])
            total += blocks[i][1] - blocks[i][0]
            i += 1
        ids = torch.cat([carry] + [torch.arange(a, b) for a, b in chosen])
        n_full = len(ids) // batch_size
        perm = torch.randperm(len(ids), generator=gen) if shuffle else torch.arange(len(ids))
        batches = [perm[j * batch_size:(j + 1) * batch_size] for j in range(n_full)]
        if limit is not None:
            batches = batches[:limit - made]
        made += len(batches)
        rest = perm[n_full * batch_size:]
        yield Window(ids, len(carry), chosen, batches, rest)
        carry = ids[rest]
    if not drop_last and len(carry):
        yield Window(carry, len(carry), [], [torch.arange(len(carry))], torch.empty(0, dtype=torch.int64))


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def aligned_batches(acts: Any, names: Sequence[str], batch_size: int, *, split: str = "val", shuffle: bool = False,
                    seed: int = 0, drop_last: bool = False) -> Iterator[dict[str, Tensor]]:
    """Batches of aligned rows {name: [B, d]} from a dict of tensors or a store (anything with ``.batches``)."""
    if isinstance(acts, Mapping):
        missing = [n for n in names if n not in acts]
        if missing:
            raise ValueError(f"acts is missing model(s) {missing}; it has {list(acts)}")
        data = {n: torch.as_tensor(acts[n]) for n in names}
        counts = {n: len(data[n]) for n in names}
        if len(set(counts.values())) != 1:
            raise ValueError(f"acts: models disagree in row count {counts}; rows must be aligned")
        total = next(iter(counts.values()))
        # rows in memory are one block in one window: the plan is then a plain seeded permutation
        for window in epoch_plan([(0, total)], batch_size, shuffle=shuffle, seed=seed,
                                 window_rows=max(total, batch_size), drop_last=drop_last):
            for positions in window.batches:
                rows = window.ids[positions]
                yield {n: data[n][rows] for n in names}
    elif hasattr(acts, "batches"):
        kwargs: dict[str, Any] = {"shuffle": shuffle, "seed": seed}
        if _accepts(acts.batches, "drop_last"):
            kwargs["drop_last"] = drop_last
        if _accepts(acts.batches, "models"):
            kwargs["models"] = tuple(names)
        yield from acts.batches(split, batch_size, **kwargs)
    else:
        raise ValueError(f"acts of type {type(acts).__name__} is not valid; expected a dict name -> [N, d] tensor "
                         "or an ActivationStore-like object with .batches(split, batch_size, shuffle, seed)")
