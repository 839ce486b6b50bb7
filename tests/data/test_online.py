"""usae.data.online / usae.stats.streaming: token batches straight from images equal the store's, training and resume on
them, one-pass streaming evaluation equal to the store-based statistics, bounded memory, bad input."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from usae.config import BackboneSpec, ExtractConfig, ToyWorldConfig, TrainConfig
from usae.core.model import UniversalSAE
from usae.data.batches import epoch_plan
from usae.data.extract import extract_store
from usae.data.online import OnlineSource
from usae.data.sources import toy_source
from usae.data.toyworld import ToyWorld
from usae.data.zoo import load_backbone
from usae.stats.firing import firing_stats
from usae.stats.galleries import concept_heatmaps, top_images
from usae.stats.reconstruction import reconstruction_stats
from usae.stats.streaming import evaluate_online, evaluate_source, model_standardisations
from usae.train.trainer import Trainer

NAMES = ("toy_vit", "toy_mixer")
N_TRAIN, N_VAL, BLOCK = 40, 12, 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world_setup(tmp_path_factory):
    """Random-weight toy backbones, toy-world images and a float32 store of them (one shard)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbones = {n: load_backbone(BackboneSpec(n, pretrained=False)) for n in NAMES}
    world = ToyWorld(ToyWorldConfig())
    splits = {"train": toy_source(world, "train", N_TRAIN), "val": toy_source(world, "val", N_VAL)}
    cfg = ExtractConfig(n_train_images=N_TRAIN, n_val_images=N_VAL, n_stats_images=20, batch_size=BLOCK,
                        dtype="float32")
    store = extract_store(backbones, splits, cfg, tmp_path_factory.mktemp("online") / "store", progress=False)
    yield backbones, splits, store
    torch.set_num_threads(threads)


def source(world_setup, **kw):
    backbones, splits, store = world_setup
    kw.setdefault("stats", store.stats)
    kw.setdefault("block_images", BLOCK)
    return OnlineSource(backbones, splits, 8, progress=False, **kw)


def fresh_model(store, m=64, k=4):
    torch.manual_seed(0)
    model = UniversalSAE(store.dims, m, k)
    for n in store.models:
        model.set_standardisation(n, store.stats[n].mean, store.stats[n].std)
    return model


def assert_same_model(a, b, atol=0.0):
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=key)


# -- batches ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_online_batches_equal_store_batches(world_setup, shuffle):
    _, _, store = world_setup
    fitted = source(world_setup, stats=None, n_stats_images=20)  # fits its own standardisation like extraction
    for n in NAMES:
        assert fitted.stats[n].to_dict() == store.stats[n].to_dict()
    online = source(world_setup, window_rows=700)
    want = list(store.batches("train", 100, shuffle=shuffle, seed=3, block_rows=BLOCK * 64, window_rows=700,
                              drop_last=False))
    got = list(online.batches("train", 100, shuffle=shuffle, seed=3, drop_last=False))
    assert len(got) == len(want) == -(-N_TRAIN * 64 // 100)
    for x, y in zip(want, got, strict=True):
        assert set(y) == set(NAMES)
        for n in NAMES:
            assert torch.equal(x[n], y[n])
    again = next(iter(online.batches("train", 100, shuffle=shuffle, seed=3)))
    assert torch.equal(again["toy_vit"], got[0]["toy_vit"])                      # deterministic given the seed
    if shuffle:
        other = next(iter(online.batches("train", 100, shuffle=True, seed=4)))
        assert not torch.equal(other["toy_vit"], got[0]["toy_vit"])              # a new seed, a new order
    for start, stop in ((0, 64), (70, 300)):
        torch.testing.assert_close(online.rows("train", "toy_mixer", start, stop),
                                   store.rows("train", "toy_mixer", start, stop), rtol=0, atol=0)


def test_sharded_plan_partitions_blocks_with_equal_batch_counts():
    blocks = [(a, min(a + 64, 1000)) for a in range(0, 1000, 64)]               # a partial last block
    plain = [w.ids[p] for w in epoch_plan(blocks, 96, seed=5, window_rows=200) for p in w.batches]
    one = [w.ids[p] for w in epoch_plan(blocks, 96, seed=5, window_rows=200, shard=(0, 1)) for p in w.batches]
    assert all(torch.equal(a, b) for a, b in zip(plain, one, strict=True)) and len(plain) == len(one) == 1000 // 96
    per_rank = [[w.ids[p] for w in epoch_plan(blocks, 32, seed=5, window_rows=64, shard=(r, 3)) for p in w.batches]
                for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 0
    seen = [set(torch.cat(b).tolist()) for b in per_rank]
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    for rows in seen:  # every rank reads only whole blocks assigned to it
        assert {i // 64 for i in rows} <= set(range(16))
    with pytest.raises(ValueError, match="drop_last"):
        next(epoch_plan(blocks, 32, shard=(0, 2), drop_last=False))
    with pytest.raises(ValueError, match="shard"):
        next(epoch_plan(blocks, 32, shard=(2, 2)))
    with pytest.raises(ValueError, match="window_rows"):
        next(epoch_plan(blocks, 32, window_rows=16))


# -- training --------------------------------------------------------------------------------------------------
def test_training_from_images_equals_training_from_the_store(world_setup):
    _, _, store = world_setup
    cfg = TrainConfig(steps=6, batch_size=256, warmup_steps=2, log_every=3, lr=1e-2)
    a, b = fresh_model(store), fresh_model(store)
    ha = Trainer(a, cfg, progress=False).fit(store)
    hb = Trainer(b, cfg, progress=False).fit(source(world_setup, block_images=32))  # the store's 2048-row blocks
    assert ha.loss == hb.loss and ha.model == hb.model
    assert_same_model(a, b)


def test_resume_skips_batches_without_running_the_backbones(world_setup, tmp_path):
    _, _, store = world_setup
    online = source(world_setup, block_images=2, window_rows=300)            # many windows, rows carried over
    cfg = TrainConfig(steps=16, batch_size=96, warmup_steps=2, log_every=4, lr=1e-2, checkpoint_every=11)
    whole = fresh_model(store)
    Trainer(whole, cfg, progress=False).fit(online)

    class Crash(Trainer):
        def train_step(self, batch):
            if self.step == 12:
                raise KeyboardInterrupt
            return super().train_step(batch)

    with pytest.raises(KeyboardInterrupt):
        Crash(fresh_model(store), cfg, progress=False, checkpoint_dir=tmp_path).fit(online)
    before = online.meter["images"]
    resumed = fresh_model(store)
    Trainer(resumed, cfg, progress=False, checkpoint_dir=tmp_path).fit(online)
    assert_same_model(whole, resumed)                                         # bit for bit
    made = online.meter["images"] - before
    needed = -(-(cfg.steps - 11) * cfg.batch_size // 64)                      # images of the 5 remaining batches
    assert made <= needed + 2 * 300 // 64 + 4, made                            # + one window of carried rows
    assert made < 11 * cfg.batch_size // 64                                   # not the 11 skipped batches


def test_memory_is_bounded_by_one_window(world_setup):
    online = source(world_setup, block_images=2, window_rows=256)
    refs = []
    for j, batch in enumerate(online.batches("train", 64, seed=1)):  # noqa: B007 (j counts the batches)
        batch["toy_vit"]
        if not refs or refs[-1]() is not batch._window:
            refs.append(weakref.ref(batch._window))
        del batch
        assert sum(r() is not None for r in refs) == 1                       # only the current window is held
    assert j + 1 == N_TRAIN * 64 // 64
    assert online.meter["peak_rows"] <= 256 + 2 * 64 + 64
    assert online.meter["images"] == N_TRAIN and online.throughput() > 0


def test_bf16_autocast_and_experiment_wiring(world_setup):
    backbones, splits, store = world_setup
    exact = next(iter(source(world_setup).batches("val", 256, shuffle=False)))
    half = next(iter(source(world_setup, autocast=torch.bfloat16).batches("val", 256, shuffle=False)))
    for n in NAMES:
        torch.testing.assert_close(half[n], exact[n], atol=0.1, rtol=0.05)
    cfg = ExtractConfig(n_stats_images=20, batch_size=8)
    fake = SimpleNamespace(config=SimpleNamespace(extract=cfg), backbones=lambda: backbones,
                           image_sources=lambda: splits, progress=False)
    online = OnlineSource.from_experiment(fake)
    assert online.block_images == 8 and online.grid == 8 and online.n_rows("val") == N_VAL * 64
    for n in NAMES:
        torch.testing.assert_close(online.stats[n].std, store.stats[n].std)
        torch.testing.assert_close(online.stats[n].mean, store.stats[n].mean, atol=1e-6, rtol=1e-5)


# -- evaluation ------------------------------------------------------------------------------------------------
def test_streaming_evaluation_equals_the_store_statistics(world_setup):
    backbones, splits, store = world_setup
    model = fresh_model(store)
    Trainer(model, TrainConfig(steps=6, batch_size=256, warmup_steps=2, lr=1e-2), progress=False).fit(store)
    concepts = [0, 5, 17, 40]
    ev = evaluate_online(model, backbones, splits["val"], 8, block_images=BLOCK, concepts=concepts, n_top=3,
                         progress=False)
    ref = reconstruction_stats(model, store)
    for key, value in ref.state().items():
        torch.testing.assert_close(ev.reconstruction.state()[key], value, rtol=1e-9, atol=1e-9, msg=key)
    torch.testing.assert_close(ev.r2(), ref.matrix())
    fires = firing_stats(model, store, progress=False)
    assert ev.firing.n_tokens == fires.n_tokens == N_VAL * 64 and ev.n_images == N_VAL
    for key in ("fires", "cofires", "nonzero", "atom_norms"):
        assert torch.equal(getattr(ev.firing, key), getattr(fires, key)), key
    torch.testing.assert_close(ev.firing.activation_sum, fires.activation_sum)
    top = top_images(model, store, concepts, n_top=3, progress=False)
    assert torch.equal(ev.top.images, top.images) and torch.equal(ev.top.scores, top.scores)
    src = source(world_setup, stats=model_standardisations(model))
    maps = concept_heatmaps(model, src, [1, 7], [5, 17])                      # galleries read rows from images too
    for n, want in concept_heatmaps(model, store, [1, 7], [5, 17]).items():
        torch.testing.assert_close(maps[n], want)
    for pooling in ("mean", "max"):                                           # all m concepts from the sparse codes
        every = evaluate_source(model, src, concepts=None, n_top=3, pooling=pooling)
        some = top_images(model, store, concepts, n_top=3, pooling=pooling, progress=False)
        torch.testing.assert_close(every.top.scores[concepts], some.scores)
        assert torch.equal(every.top.images[concepts], some.images)
        assert every.top.images.shape == (model.n_latents, 3)


def test_bad_inputs(world_setup):
    backbones, splits, store = world_setup
    with pytest.raises(ValueError, match="dim"):
        OnlineSource({"x": nn.Identity()}, splits, 8, stats=store.stats)
    with pytest.raises(ValueError, match="stats"):
        OnlineSource(backbones, {"val": splits["val"]}, 8)                   # nothing to fit statistics on
    with pytest.raises(ValueError, match="block_images"):
        source(world_setup, block_images=0)
    online = source(world_setup)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        next(iter(online.batches("test", 64)))
    with pytest.raises(ValueError, match="models"):
        next(iter(online.batches("train", 64, models=["nope"])))
    with pytest.raises(ValueError, match="rows"):
        online.rows("val", "toy_vit", 0, N_VAL * 64 + 1)
    model = UniversalSAE(store.dims, 64, 4)
    with pytest.raises(ValueError, match="standardisation"):
        evaluate_online(model, backbones, splits["val"], 8)
    with pytest.raises(ValueError, match="quantile"):
        evaluate_source(model, online, pooling="quantile")
    with pytest.raises(ValueError, match="concepts"):
        evaluate_source(model, online, concepts=[1, 1])
    with pytest.raises(ValueError, match="backbones"):
        evaluate_online(model, {"toy_vit": backbones["toy_vit"]}, splits["val"], 8, stats=store.stats)
