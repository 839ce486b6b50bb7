"""usae.train.distributed: two gloo ranks under torchrun train the same USAE as one process on the same global
batches (BatchNorm encoder; aux official / none / AuxK with dead latents; dict and store sources; checkpoint
and resume), the synced BatchNorm against nn.BatchNorm1d, one rank bit for bit equal to Trainer, the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from usae.config import TrainConfig
from usae.core.model import UniversalSAE
from usae.data.standardisation import Standardisation
from usae.data.store import ActivationStore
from usae.data.store_writer import StoreWriter
from usae.train.distributed import DistributedTrainer, init_distributed, main, synced_batch_norm
from usae.train.history import TrainHistory
from usae.train.trainer import Trainer

DIMS = {"a": 6, "b": 10, "c": 4}
DEGENERATE = ("linear.bias", "bn.running_mean")  # a bias before BatchNorm gets only rounding-noise gradients
CASES = {  # name: (TrainConfig changes, source, n_latents, k)
    "official": (dict(aux="official"), "dict", 24, 3),
    "none_joint": (dict(aux="none", update="joint"), "dict", 24, 3),
    "auxk_dead": (dict(aux="auxk", auxk_k=4, dead_after_tokens=48), "dict", 96, 2),
    "store": (dict(aux="official"), "store", 24, 3),
}


def train_config(**changes):
    base = dict(steps=8, batch_size=32, warmup_steps=2, log_every=4, lr=1e-2, final_lr=1e-4)
    base.update(changes)
    return TrainConfig(**base)


def make_data(n=160, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, d, generator=g) * (1 + i) + i for i, (name, d) in enumerate(DIMS.items())}


def make_store(path, data, grid=2):
    """A float32 store of ``data`` in several shards (grid x grid tokens per image)."""
    n_images = len(data["a"]) // (grid * grid)
    with StoreWriter(path, DIMS, grid, "float32", shard_bytes=grid * grid * 10 * 4 * 7) as w:
        w.add_split("train", n_images)
        for name, rows in data.items():
            w.write("train", name, 0, rows)
        return w.finish({n: Standardisation.identity() for n in DIMS})


def plain_trainer(model, cfg, **kwargs):
    """A Trainer on the plain autograd encoder path, the one DistributedTrainer takes."""
    trainer = Trainer(model, cfg, progress=False, **kwargs)
    trainer.fused_encoder = False
    return trainer


def make_model(m, k, seed=0):
    torch.manual_seed(seed)
    return UniversalSAE(DIMS, m, k)


WORKER = textwrap.dedent('''
    import sys, json, torch
    from pathlib import Path
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[2])
    import test_distributed as T
    from usae.train.distributed import DistributedTrainer, init_distributed
    from usae.data.online import OnlineSource
    from usae.data.standardisation import Standardisation
    from usae.data.store import ActivationStore

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    rank, world, _ = init_distributed("gloo", "cpu")
    data, store = T.make_data(), ActivationStore.open(out / "store")

    def save(tag, model, history, **extra):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{tag}-{rank}.safetensors"))
        (out / f"{tag}-{rank}.json").write_text(json.dumps({**history.to_dict(), **extra}))

    for tag, (changes, kind, m, k) in T.CASES.items():
        model = T.make_model(m, k)
        history = DistributedTrainer(model, T.train_config(**changes), progress=False).fit(
            data if kind == "dict" else store)
        save(tag, model, history)

    class Crash(DistributedTrainer):
        def train_step(self, batch):
            if self.step == 5:
                raise KeyboardInterrupt
            return super().train_step(batch)

    cfg = T.train_config(checkpoint_every=3)
    try:
        Crash(T.make_model(24, 3), cfg, progress=False, checkpoint_dir=out / "ckpt").fit(data)
    except KeyboardInterrupt:
        pass
    model = T.make_model(24, 3)
    save("resumed", model, DistributedTrainer(model, cfg, progress=False, checkpoint_dir=out / "ckpt").fit(data))

    class Patches(torch.nn.Module):  # a tiny frozen "backbone": 4x4 patches -> 6 channels on a 2x2 grid
        dim = 6
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 4, stride=4)
        def forward(self, x):
            return self.conv(x).permute(0, 2, 3, 1)

    torch.manual_seed(0)
    backbones = {n: Patches() for n in ("p", "q")}
    images = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ident = {n: Standardisation.identity() for n in backbones}
    online = OnlineSource(backbones, images, 2, stats=ident, block_images=2, window_rows=32, progress=False)
    torch.manual_seed(0)
    model = T.UniversalSAE({"p": 6, "q": 6}, 24, 3)
    history = DistributedTrainer(model, T.train_config(steps=4, batch_size=16), progress=False).fit(online)
    save("online", model, history, images=online.meter["images"])
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the worker on 2 gloo ranks under torchrun; returns its output folder."""
    out = tmp_path_factory.mktemp("ddp")
    make_store(out / "store", make_data())
    (out / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(out / "worker.py"), str(out),
           str(Path(__file__).parent)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


def read(out, tag, rank):
    return load_file(str(out / f"{tag}-{rank}.safetensors")), json.loads((out / f"{tag}-{rank}.json").read_text())


def assert_models_match(got, want, atol=1e-5, degenerate_atol=None):
    for key, value in want.items():
        if key.endswith(DEGENERATE):
            if degenerate_atol is not None:
                torch.testing.assert_close(got[key], value, atol=degenerate_atol, rtol=0, msg=key)
            continue
        torch.testing.assert_close(got[key], value.to(got[key].dtype), atol=atol, rtol=1e-5, msg=key)


@pytest.mark.parametrize("tag", list(CASES))
def test_two_ranks_train_what_one_process_trains(two_ranks, tag):
    changes, kind, m, k = CASES[tag]
    r0, h0 = read(two_ranks, tag, 0)
    r1, h1 = read(two_ranks, tag, 1)
    for key in r0:  # the ranks hold the same model, bit for bit
        assert torch.equal(r0[key], r1[key]), key
    assert h0 == h1
    model, cfg = make_model(m, k), train_config(**changes)
    data = make_data()
    source = data if kind == "dict" else ActivationStore.open(two_ranks / "store")
    want = Trainer(model, cfg, progress=False).fit(source).to_dict()
    assert_models_match(r0, model.state_dict(), degenerate_atol=2 * cfg.steps * cfg.lr)
    assert h0["model"] == want["model"]                                        # the same model picked each step
    np.testing.assert_allclose(h0["loss"], want["loss"], rtol=1e-5)
    for name in DIMS:
        np.testing.assert_allclose(h0["recon"][name], want["recon"][name], rtol=1e-5)
    for got, ref in zip(h0["log"], want["log"], strict=True):
        assert got["dead_fraction"] == ref["dead_fraction"]                    # counters merged over ranks
        np.testing.assert_allclose(got["r2"], ref["r2"], rtol=1e-4, atol=1e-5)
    if tag == "auxk_dead":
        assert any(v > 0 for v in want["log"][-1]["dead_fraction"].values())   # AuxK really had dead latents


def test_resume_and_online_source_on_two_ranks(two_ranks):
    resumed, hr = read(two_ranks, "resumed", 0)
    whole, hw = read(two_ranks, "official", 0)
    for key in whole:                                                          # checkpoint + resume is exact
        assert torch.equal(resumed[key], whole[key]), key
    assert hr["loss"] == hw["loss"] and json.dumps(hr["log"]) == json.dumps(hw["log"])
    assert sorted(p.name for p in (two_ranks / "ckpt").iterdir()) == ["step_000000006", "step_000000008"]
    a, ha = read(two_ranks, "online", 0)
    b, hb = read(two_ranks, "online", 1)
    assert all(torch.equal(a[key], b[key]) for key in a) and len(ha["loss"]) == 4
    assert ha["images"] + hb["images"] <= 40 and ha["images"] > 0 and hb["images"] > 0  # each its own images


def test_rank_shards_concatenate_to_the_global_batches(tmp_path):
    from usae.data.batches import aligned_batches
    from usae.data.sharding import shard_source

    data = make_data()
    store = make_store(tmp_path / "store", data)
    for source in (store, data):
        want = list(aligned_batches(source, list(DIMS), 32, split="train", shuffle=True, seed=7, drop_last=True))
        parts = [list(aligned_batches(shard_source(source, r, 2), list(DIMS), 32, split="train", shuffle=True,
                                      seed=7, drop_last=True)) for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == len(want) == 5
        for w, p0, p1 in zip(want, *parts, strict=True):
            for n in DIMS:
                assert p0[n].shape[0] == 16 and torch.equal(torch.cat([p0[n], p1[n]]), w[n])
    batches = [{n: v[:32] for n, v in data.items()}]
    halves = [list(shard_source(batches, r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([halves[0][0]["a"], halves[1][0]["a"]]), data["a"][:32])
    with pytest.raises(ValueError, match="evenly"):
        list(shard_source([{n: v[:33] for n, v in data.items()}], 0, 2))


# -- one process -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    created = not dist.is_initialized()
    yield init_distributed("gloo", "cpu")
    if created:
        dist.destroy_process_group()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_synced_batch_norm_equals_batchnorm1d(one_rank, momentum):
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm1d(5, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    mine = torch.nn.BatchNorm1d(5, momentum=momentum)
    mine.load_state_dict(ref.state_dict())
    for _ in range(3):
        h = torch.randn(16, 5) * 3 + 2
        h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
        g = torch.randn(16, 5)
        (ref(h1) * g).sum().backward()
        (synced_batch_norm(h2, mine) * g).sum().backward()
        torch.testing.assert_close(h2.grad, h1.grad, atol=1e-5, rtol=1e-5)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(mine.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
        for p, q in zip(mine.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aux", ["official", "none", "auxk"])
def test_one_rank_is_the_trainer_bit_for_bit(one_rank, aux, tmp_path):
    data = make_data()
    cfg = train_config(aux=aux, auxk_k=4, dead_after_tokens=48, checkpoint_every=5)
    a, b = make_model(96, 2), make_model(96, 2)
    ha = plain_trainer(a, cfg).fit(data)
    hb = DistributedTrainer(b, cfg, progress=False, checkpoint_dir=tmp_path).fit(data)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    assert ha.loss == hb.loss and json.dumps(ha.to_dict()["log"]) == json.dumps(hb.to_dict()["log"])  # NaN-safe
    assert [p.name for p in DistributedTrainer(b, cfg, checkpoint_dir=tmp_path).checkpoints()] == [
        "step_000000005", "step_000000008"]


def test_bad_inputs(one_rank):
    with pytest.raises(ValueError, match="backend"):
        init_distributed("mpi")
    with pytest.raises(ValueError, match="device"):
        init_distributed("gloo", "tpu")
    with pytest.raises(ValueError, match="cannot shard"):
        DistributedTrainer(make_model(24, 3), train_config(), progress=False).fit(_StoreLike())


class _StoreLike:
    def batches(self, *args, **kwargs):
        return iter(())


def test_command_line(one_rank, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--store DIR | --images DIR" in capsys.readouterr().out
    data = make_data()
    make_store(tmp_path / "store", data)
    args = ["--preset", "smoke", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--steps", "6",
            "--batch-size", "32", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    history = TrainHistory.from_dict(json.loads((tmp_path / "run" / "history.json").read_text()))
    assert history.run["world_size"] == 1 and history.run["steps"] == 6 and len(history.loss) == 6
    got = UniversalSAE.load(tmp_path / "run" / "model.safetensors")
    from usae.config import preset

    cfg = preset("smoke")
    torch.manual_seed(cfg.train.seed)
    want = UniversalSAE(DIMS, cfg.usae.width(DIMS), cfg.usae.k, encoder=cfg.usae.encoder)
    store = ActivationStore.open(tmp_path / "store")
    for n in DIMS:
        want.set_standardisation(n, store.stats[n].mean, store.stats[n].std)
    plain_trainer(want, cfg.train.replace(steps=6, batch_size=32)).fit(store)
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    assert main(args) == 0                                                     # finished: resumes, trains 0 steps
    assert json.loads((tmp_path / "run" / "history.json").read_text())["run"]["steps"] == 0
    with pytest.raises(ValueError, match="splits"):
        main(args[:-1] + ["--split", "val"])


def test_command_line_on_an_image_folder(one_rank, tmp_path):
    from PIL import Image

    from usae.config import ToyWorldConfig
    from usae.data.toyworld import ToyWorld

    images = ToyWorld(ToyWorldConfig()).batch("train", 0, 12).images
    (tmp_path / "images").mkdir()
    for i, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "images" / f"{i}.png")
    assert main(["--preset", "smoke", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "run"),
                 "--models", "toy_vit", "toy_mixer", "--random-weights", "--steps", "3", "--batch-size", "64",
                 "--block-images", "2", "--device", "cpu", "--no-progress"]) == 0
    run = json.loads((tmp_path / "run" / "history.json").read_text())["run"]
    assert run["source"] == "images" and run["steps"] == 3 and run["backbone_tokens_per_s_per_rank"] > 0
    model = UniversalSAE.load(tmp_path / "run" / "model.safetensors")
    assert model.names == ("toy_vit", "toy_mixer") and model.standardisation("toy_vit") is not None
    with pytest.raises(ValueError, match="--zoo"):
        main(["--preset", "smoke", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "x")])
