"""Tests of usae.data.store: round trips, alignment, shuffled epochs, completeness and corruption checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from usae.data.standardisation import Standardisation
from usae.data.store import ActivationStore, StoreError
from usae.data.store_writer import StoreWriter

DIMS = {"a": 3, "b": 5}
GRID = 2  # 4 tokens per image


def _rows(model: str, start: int, stop: int) -> torch.Tensor:
    """Synthetic activations whose columns encode the row index (exact in float16 below 2048)."""
    r = torch.arange(start, stop, dtype=torch.float32)[:, None]
    cols = torch.arange(DIMS[model], dtype=torch.float32)[None, :]
    return r + (0.25 if model == "a" else -0.5) * cols


def _write(path, n_images=50, dtype="float32", shard_bytes=1 << 30, meta=None, labels=True, chunk=7):
    stats = {"a": Standardisation(torch.tensor(0.5), torch.tensor(2.0)),
             "b": Standardisation(torch.zeros(5), torch.ones(5), "channel")}
    with StoreWriter(path, DIMS, GRID, dtype, shard_bytes=shard_bytes) as w:
        w.add_split("train", n_images)
        w.add_split("val", 3)
        for split, n in (("train", n_images), ("val", 3)):
            rows = n * GRID * GRID
            for m in DIMS:
                for s in range(0, rows, chunk):  # chunks that straddle image and shard boundaries
                    w.write(split, m, s, _rows(m, s, min(rows, s + chunk)))
            if labels:
                w.write_labels(split, "pos", 0, np.arange(rows) % (GRID * GRID))
        return w.finish(stats, meta or {"config": "x", "n": [1, 2]})


@pytest.mark.parametrize("dtype,shard_bytes", [("float32", 1 << 30), ("float16", 1 << 30), ("float32", 100)])
def test_roundtrip(tmp_path, dtype, shard_bytes):
    store = _write(tmp_path / "s", dtype=dtype, shard_bytes=shard_bytes)
    again = ActivationStore.open(tmp_path / "s", expect_meta={"config": "x", "n": (1, 2)})
    if shard_bytes == 100:
        assert len(again.manifest["splits"]["train"]["shards"]) > 5
    assert again.models == ("a", "b") and again.dims == DIMS and again.tokens_per_image == 4
    assert again.splits == ("train", "val") and again.n_rows("train") == 200 and again.n_images("val") == 3
    for m in DIMS:
        full = again.rows("train", m, 0, 200)
        assert full.dtype == torch.float32
        torch.testing.assert_close(full, _rows(m, 0, 200), rtol=1e-3 if dtype == "float16" else 0, atol=0)
        torch.testing.assert_close(again.rows("train", m, 13, 101), full[13:101])  # spans shards
        assert again.rows("val", m, 0, 0).shape == (0, DIMS[m])
    assert again.stats["a"].mode == "scalar" and float(again.stats["a"].std) == 2.0
    assert again.stats["b"].mean.shape == (5,)
    np.testing.assert_array_equal(again.labels("train")["pos"], np.arange(200) % 4)
    assert store.meta == {"config": "x", "n": [1, 2]}
    assert "train: 200 rows" in repr(store)


def _epoch(store, **kw):
    batches = list(store.batches("train", **kw))
    for b in batches:  # aligned: row r of "a" and "b" belong to the same row r
        ra, rb = b["a"][:, 0], b["b"][:, 0]
        torch.testing.assert_close(ra, rb)
        torch.testing.assert_close(b["a"], ra[:, None] + 0.25 * torch.arange(3.0))
        assert b["a"].dtype == torch.float32
    return batches


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("window_rows", [None, 16, 40])
def test_batches_cover_every_row_once(tmp_path, shuffle, window_rows):
    store = _write(tmp_path / "s", shard_bytes=80)
    batches = _epoch(store, batch_size=16, shuffle=shuffle, seed=3, drop_last=False, block_rows=6,
                     window_rows=window_rows)
    seen = torch.cat([b["a"][:, 0] for b in batches]).long()
    assert sorted(seen.tolist()) == list(range(200))
    assert [len(b["a"]) for b in batches] == [16] * 12 + [8]
    if shuffle:
        assert seen.tolist() != list(range(200))
    else:
        assert seen.tolist() == list(range(200))
    dropped = _epoch(store, batch_size=16, shuffle=shuffle, seed=3, drop_last=True, block_rows=6,
                     window_rows=window_rows)
    rows = torch.cat([b["a"][:, 0] for b in dropped]).long().tolist()
    assert len(rows) == 192 and len(set(rows)) == 192


def test_batches_are_deterministic_per_seed(tmp_path):
    store = _write(tmp_path / "s")
    one = [b["a"][:, 0].tolist() for b in store.batches("train", 32, seed=1, block_rows=8, window_rows=64)]
    two = [b["a"][:, 0].tolist() for b in store.batches("train", 32, seed=1, block_rows=8, window_rows=64)]
    other = [b["a"][:, 0].tolist() for b in store.batches("train", 32, seed=2, block_rows=8, window_rows=64)]
    assert one == two and one != other


def test_batches_subset_of_models(tmp_path):
    store = _write(tmp_path / "s")
    batch = next(iter(store.batches("train", 10, models=["b"])))
    assert list(batch) == ["b"] and batch["b"].shape == (10, 5)


def test_bad_inputs(tmp_path):
    store = _write(tmp_path / "s")
    with pytest.raises(ValueError, match="unknown split"):
        store.rows("test", "a", 0, 1)
    with pytest.raises(ValueError, match="unknown model"):
        store.rows("train", "c", 0, 1)
    with pytest.raises(ValueError, match="0 <= start <= stop <= 200"):
        store.rows("train", "a", 5, 201)
    with pytest.raises(ValueError, match="batch_size"):
        next(store.batches("train", 0))
    with pytest.raises(ValueError, match="window_rows"):
        next(store.batches("train", 64, window_rows=8))
    with pytest.raises(ValueError, match="unknown model"):
        next(store.batches("train", 8, models=["zzz"]))
    with pytest.raises(ValueError, match="dtype"):
        StoreWriter(tmp_path / "t", DIMS, GRID, "int8")
    with pytest.raises(ValueError, match="grid"):
        StoreWriter(tmp_path / "t", DIMS, 0)
    with pytest.raises(FileExistsError):
        StoreWriter(tmp_path / "s", DIMS, GRID)
    with StoreWriter(tmp_path / "t", DIMS, GRID) as w:
        w.add_split("train", 2)
        with pytest.raises(ValueError, match="do not fit"):
            w.write("train", "a", 6, torch.zeros(3, 3))
        with pytest.raises(ValueError, match="do not fit"):
            w.write("train", "a", 0, torch.zeros(3, 4))
        with pytest.raises(ValueError, match="integers"):
            w.write_labels("train", "pos", 0, np.zeros(3, dtype=np.float32))
        with pytest.raises(ValueError, match="n_images"):
            w.add_split("val", 0)
        w.write("train", "a", 0, torch.zeros(8, 3))
        w.write("train", "b", 0, torch.zeros(5, 5))
        with pytest.raises(ValueError, match="'b': 5 rows were written"):
            w.finish({m: Standardisation.identity() for m in DIMS})
        w.abort()
    with pytest.raises(ValueError, match="mode"):
        Standardisation(torch.tensor(0.0), torch.tensor(1.0), "minmax")
    with pytest.raises(ValueError, match="1-d"):
        Standardisation(torch.tensor(0.0), torch.tensor(1.0), "channel")


def test_interrupted_writer_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with StoreWriter(tmp_path / "s", DIMS, GRID) as w:
            w.add_split("train", 2)
            w.write("train", "a", 0, torch.zeros(8, 3))
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_store(tmp_path):
    _write(tmp_path / "s", n_images=50)
    with StoreWriter(tmp_path / "s", {"a": 3}, GRID, overwrite=True) as w:
        w.add_split("train", 1)
        w.write("train", "a", 0, torch.ones(4, 3))
        store = w.finish({"a": Standardisation.identity()})
    assert store.n_rows("train") == 4 and store.models == ("a",)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_missing_manifest_is_an_error(tmp_path):
    _write(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest"):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="not a folder"):
        ActivationStore.open(tmp_path / "nothing")


def test_truncated_shard_is_an_error(tmp_path):
    _write(tmp_path / "s", shard_bytes=100)
    shard = tmp_path / "s" / "train" / "b" / "00002.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(StoreError, match="00002.npy.*truncated"):
        ActivationStore.open(tmp_path / "s")
    shard.write_bytes(data + b"\0" * 4)
    with pytest.raises(StoreError, match="bytes"):
        ActivationStore.open(tmp_path / "s")
    shard.unlink()
    with pytest.raises(StoreError, match="missing"):
        ActivationStore.open(tmp_path / "s")


def test_corrupted_files_are_errors(tmp_path):
    _write(tmp_path / "s")
    shard = tmp_path / "s" / "train" / "a" / "00000.npy"
    shard.write_bytes(b"garbage" * 100)
    with pytest.raises(StoreError, match="corrupted"):
        ActivationStore.open(tmp_path / "s")
    _write(tmp_path / "t")
    np.save(tmp_path / "t" / "train" / "a" / "00000.npy", np.zeros((200, 4), np.float32))  # wrong width
    with pytest.raises(StoreError, match="manifest says"):
        ActivationStore.open(tmp_path / "t")
    _write(tmp_path / "u")
    (tmp_path / "u" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="JSON"):
        ActivationStore.open(tmp_path / "u")
    _write(tmp_path / "v")
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    manifest["version"] = 99
    (tmp_path / "v" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="version"):
        ActivationStore.open(tmp_path / "v")


def test_expect_meta_mismatch_is_an_error(tmp_path):
    _write(tmp_path / "s", meta={"hash": "abc", "models": ["a", "b"]})
    ActivationStore.open(tmp_path / "s", expect_meta={"hash": "abc", "models": ("a", "b")})
    with pytest.raises(StoreError, match="another configuration.*hash"):
        ActivationStore.open(tmp_path / "s", expect_meta={"hash": "abd", "models": ["a", "b"]})
    with pytest.raises(StoreError, match="extra"):
        ActivationStore.open(tmp_path / "s", expect_meta={"hash": "abc", "models": ["a", "b"], "extra": 1})


def test_standardisation_apply_invert_and_serialise():
    x = torch.randn(10, 4) * 3 + 1
    s = Standardisation(torch.tensor(1.0), torch.tensor(3.0))
    torch.testing.assert_close(s.apply(x), (x - 1.0) / (3.0 + 1e-5))
    torch.testing.assert_close(s.invert(s.apply(x)), x)
    c = Standardisation(torch.arange(4.0), torch.full((4,), 2.0), "channel")
    torch.testing.assert_close(c.apply(x), (x - torch.arange(4.0)) / (2.0 + 1e-5))
    assert torch.equal(Standardisation.identity().apply(x), x)
    for t in (s, c):
        back = Standardisation.from_dict(json.loads(json.dumps(t.to_dict())))
        assert back.mode == t.mode and torch.equal(back.mean, t.mean) and torch.equal(back.std, t.std)
