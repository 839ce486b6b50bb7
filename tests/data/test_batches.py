"""usae.data.batches: the one shuffle plan, and aligned batches from every kind of source."""

import pytest
import torch

from usae.data.batches import aligned_batches, epoch_plan
from usae.data.standardisation import Standardisation
from usae.data.store_writer import StoreWriter

DIMS = {"a": 3, "b": 5}


def _rows(model, n):
    return torch.arange(n, dtype=torch.float32)[:, None] + (0.25 if model == "a" else -0.5) * torch.arange(DIMS[model])


def test_rows_in_memory_follow_a_plain_seeded_permutation():
    # one block in one window: the plan is exactly randperm(n) with the seed, cut into batches (last one partial)
    data = {m: _rows(m, 103) for m in DIMS}
    got = list(aligned_batches(data, ["a", "b"], 16, shuffle=True, seed=7))
    order = torch.randperm(103, generator=torch.Generator().manual_seed(7))
    assert [len(b["a"]) for b in got] == [16] * 6 + [7]
    for j, batch in enumerate(got):
        rows = order[j * 16:(j + 1) * 16]
        assert torch.equal(batch["a"], data["a"][rows]) and torch.equal(batch["b"], data["b"][rows])
    dropped = list(aligned_batches(data, ["a", "b"], 16, shuffle=True, seed=7, drop_last=True))
    assert len(dropped) == 6 and all(torch.equal(x["a"], y["a"]) for x, y in zip(dropped, got[:6], strict=True))
    plain = torch.cat([b["a"] for b in aligned_batches(data, ["a"], 16)])
    assert torch.equal(plain, data["a"])


def test_the_store_reads_exactly_the_rows_of_the_plan(tmp_path):
    n_images, grid = 60, 2
    rows = n_images * grid * grid
    with StoreWriter(tmp_path / "s", DIMS, grid, "float32", shard_bytes=1 << 30) as w:
        w.add_split("train", n_images)
        for m in DIMS:
            w.write("train", m, 0, _rows(m, rows))
        store = w.finish({m: Standardisation.identity() for m in DIMS}, {})
    for shuffle, drop_last in ((True, True), (True, False), (False, False)):
        got = list(store.batches("train", 24, shuffle=shuffle, seed=3, block_rows=20, window_rows=50,
                                 drop_last=drop_last))
        blocks = [(a, min(a + 20, rows)) for a in range(0, rows, 20)]
        want = [w.ids[p] for w in epoch_plan(blocks, 24, shuffle=shuffle, seed=3, window_rows=50, drop_last=drop_last)
                for p in w.batches]
        assert len(got) == len(want) > 0
        for batch, ids in zip(got, want, strict=True):
            assert torch.equal(batch["a"], _rows("a", rows)[ids]) and torch.equal(batch["b"], _rows("b", rows)[ids])
        seen = torch.cat(want)
        assert len(seen) == (rows - rows % 24 if drop_last else rows) and len(seen.unique()) == len(seen)


def test_bad_sources_and_sizes_are_named():
    with pytest.raises(ValueError, match="batch_size = 0"):
        list(aligned_batches({"a": torch.zeros(4, 3)}, ["a"], 0))
    with pytest.raises(ValueError, match="missing model"):
        list(aligned_batches({"a": torch.zeros(4, 3)}, ["a", "b"], 2))
    with pytest.raises(ValueError, match="disagree in row count"):
        list(aligned_batches({"a": torch.zeros(4, 3), "b": torch.zeros(5, 3)}, ["a", "b"], 2))
    with pytest.raises(ValueError, match="expected a dict"):
        list(aligned_batches([1, 2], ["a"], 2))
