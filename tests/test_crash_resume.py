"""Crash and resume: ``kill -9`` in the middle of training or extraction, then the same command again.

The subprocess tests drive the real command line (``python -m usae.cli``) on a tiny toy experiment: the child
is killed with SIGKILL as soon as it has written a checkpoint (training) or completed a shard (extraction),
the command is run again, and the result is compared with an uninterrupted run of the same command, tensor for
tensor (``torch.equal``) and byte for byte. The in-process tests cover what a kill cannot reach precisely:
corrupted kept shards are recomputed, other settings discard old work, and an interrupted writer never leaves
anything that opens as a store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from usae.config import ExtractConfig, TrainConfig, ZooTrainConfig, preset
from usae.data.extract import extract_store
from usae.data.sources import ImageSource
from usae.data.store import ActivationStore, StoreError
from usae.data.store_writer import StoreWriter
from usae.experiment import Experiment, _stable_hash

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(n_train: int = 64, n_val: int = 16, steps: int = 160, checkpoint_every: int = 10):
    return preset("smoke").replace(
        backbones=(),
        zoo=ZooTrainConfig(models=("toy_vit", "toy_convnext"), n_train_images=64, n_val_images=32, steps=2,
                           batch_size=16),
        extract=ExtractConfig(n_train_images=n_train, n_val_images=n_val, n_stats_images=32, batch_size=16),
        train=TrainConfig(steps=steps, batch_size=256, lr=3e-2, warmup_steps=10, log_every=20,
                          checkpoint_every=checkpoint_every))


def cli(command: str, config_file: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "usae.cli", command, "--config", str(config_file), "--runs", str(runs), *extra]


def child_env() -> dict[str, str]:
    # the same thread count as this process, whose in-process reference runs the children are compared with
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop("USAE_RUNS", None)
    return env


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def kill_when(cmd: list[str], ready, timeout: float = 120.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true; fail if it ends by itself first."""
    # the child runs at the lowest priority so that, on a loaded machine, this polling loop still sees the
    # kill point long before the child could finish its work
    child = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=lambda: os.nice(19))
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if child.poll() is not None:
                pytest.fail(f"the child ended (exit {child.returncode}) before it could be killed: "
                            f"{child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the child never reached the point where it should be killed")
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


def safetensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def zoo_runs(tmp_path_factory) -> Path:
    """A runs folder holding the tiny toy zoo (its key does not depend on extraction or training settings)."""
    runs = tmp_path_factory.mktemp("zoo") / "runs"
    Experiment(tiny_config(), runs=runs, progress=False).zoo_dir()
    return runs


# ------------------------------------------------------------------------------------------------ training
def test_kill_9_during_training_resumes_to_bit_identical_weights(tmp_path, zoo_runs):
    config = tiny_config()
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    runs, reference_runs = tmp_path / "runs", tmp_path / "reference"
    shutil.copytree(zoo_runs, runs)
    Experiment(config, runs=runs, progress=False).store()  # zoo + store, shared by both runs
    shutil.copytree(runs, reference_runs)
    want = Experiment(config, runs=reference_runs, progress=False).usae_dir()  # uninterrupted, in this process

    def checkpointed() -> bool:
        return any(runs.glob(".usae-*.checkpoints/step_*/state.json"))

    kill_when(cli("train", config_file, runs), checkpointed)
    assert not list(runs.glob("usae-*")), "the killed run must not leave a finished-looking artifact"
    steps = sorted(p.parent.name for p in runs.glob(".usae-*.checkpoints/step_*/state.json"))
    assert not list(reference_runs.glob(".usae-*")), "a finished run leaves no checkpoints"
    assert steps and steps[-1] < f"step_{config.train.steps:09d}"

    resumed = run_to_end(cli("train", config_file, runs))
    assert "resuming from" in resumed.stderr and steps[-1] in resumed.stderr, (steps, resumed.stderr[-2000:])
    got = Path(resumed.stdout.strip())
    assert got.parent == runs and want.parent == reference_runs and got.name == want.name
    a, b = safetensors_of(got / "model.safetensors"), safetensors_of(want / "model.safetensors")
    assert sorted(a) == sorted(b) and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max |difference| {(a[key] - b[key]).abs().max().item()}"
    ha, hb = (json.loads((f / "history.json").read_text()) for f in (got, want))
    ha.pop("seconds"), hb.pop("seconds")
    assert json.dumps(ha) == json.dumps(hb)  # every loss and logged R², not just the weights
    assert not list(runs.glob(".usae-*")), "checkpoints and temp folders are removed once the artifact exists"


# ------------------------------------------------------------------------------------------------ extraction
def test_kill_9_during_extraction_keeps_finished_shards_and_never_looks_complete(tmp_path, zoo_runs):
    config = tiny_config(n_train=64, n_val=16)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    runs, reference_runs = tmp_path / "runs", tmp_path / "reference"
    shutil.copytree(zoo_runs, runs)
    shutil.copytree(zoo_runs, reference_runs)
    shard = ["--shard-mb", str(64 / 1024)]  # 4 images per shard of the widest toy model (128 x 64 tokens)
    want = Experiment(config, runs=reference_runs, progress=False, shard_bytes=64 << 10).store().path

    def journal() -> dict:
        try:
            return json.loads(next(runs.glob(".acts-*.store-work/progress.json")).read_text())
        except (StopIteration, OSError, ValueError):
            return {}

    def shard_done() -> bool:
        return sum(len(v) for v in journal().get("done", {}).values()) >= 2

    kill_when(cli("extract", config_file, runs, *shard), shard_done)
    assert not list(runs.glob("acts-*")), "the killed extraction must not leave an artifact"
    work = next(runs.glob(".acts-*.store-work"))
    assert not (work / "manifest.json").exists()
    with pytest.raises(StoreError, match="no manifest.json"):
        ActivationStore.open(work)
    done = journal()["done"]
    assert 0 < sum(map(len, done.values())) < (64 + 3 * 16) // 4  # some, not all, shards were complete
    kept = {f"{split}/{m}/{int(i):05d}.npy": os.stat(work / split / m / f"{int(i):05d}.npy")
            for split, shards in done.items() for i in shards for m in ("toy_vit", "toy_convnext")}

    out = Path(run_to_end(cli("extract", config_file, runs, *shard, "--quiet")).stdout.strip())
    for rel, before in kept.items():  # the shards completed before the kill were kept, not recomputed
        after = os.stat(out / rel)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), rel
    assert not (out / "progress.json").exists()
    got, ref = files_of(out), files_of(want)
    assert sorted(got) == sorted(ref)
    for rel in ref:
        assert got[rel] == ref[rel], rel
    assert not list(runs.glob(".acts-*"))


# ------------------------------------------------------------------------------------------------ in process
class Toy(torch.nn.Module):
    """A fixed random 'backbone': images [B, 3, 16, 16] -> tokens [B, 4, 4, dim]."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = torch.nn.Linear(48, dim)
        gen = torch.Generator().manual_seed(seed)
        torch.nn.init.normal_(self.proj.weight, generator=gen)
        torch.nn.init.normal_(self.proj.bias, generator=gen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(len(images), 4, 4, 48)
        return self.proj(patches)


def toy_backbones():
    return {"a": Toy(8, 1), "b": Toy(12, 2)}


IMAGES = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
CFG = ExtractConfig(n_train_images=32, n_val_images=8, grid=4, image_size=16, n_stats_images=12, batch_size=3)
SHARD = 4 * 16 * 12 * 2  # 4 images of the widest model, float16


def source(images: torch.Tensor, fail_at: int | None = None, loads: list | None = None) -> ImageSource:
    def load(start: int, count: int):
        if loads is not None:
            loads.append(start)
        if fail_at is not None and start >= fail_at:
            raise KeyboardInterrupt  # what Ctrl-C looks like to the writer
        labels = {"even": (torch.arange(start, start + count) % 2).repeat_interleave(16).reshape(count, 4, 4)}
        return images[start:start + count], labels

    return ImageSource(len(images), load)


def splits(fail_at: int | None = None, loads: list | None = None):
    return {"train": source(IMAGES[:32], fail_at, loads), "val": source(IMAGES[32:])}


def test_interrupted_extraction_resumes_and_recomputes_a_corrupted_shard(tmp_path):
    ref = extract_store(toy_backbones(), splits(), CFG, tmp_path / "ref", progress=False, shard_bytes=SHARD)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        extract_store(toy_backbones(), splits(fail_at=20), CFG, tmp_path / "out", progress=False,
                      shard_bytes=SHARD, work_dir=work)
    assert not (tmp_path / "out").exists() and not (work / "manifest.json").exists()
    done = json.loads((work / "progress.json").read_text())["done"]["train"]
    assert sorted(done, key=int) == ["0", "1", "2", "3", "4"]  # images 0..19, 4 per shard (load(20, 3) failed)
    bad = work / "train" / "b" / "00001.npy"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF  # silent corruption of a kept shard
    bad.write_bytes(bytes(data))
    # a kill inside atomic_write of the journal leaves its temporary sibling behind
    (work / ".progress.json.tmp-99999.json").write_text("{")

    loads: list[int] = []
    store = extract_store(toy_backbones(), splits(loads=loads), CFG, tmp_path / "out", progress=False,
                          shard_bytes=SHARD, work_dir=work)
    assert min(loads) == 4 and min(l for l in loads if l > 7) == 20  # shard 1 (images 4..7) recomputed, 0, 2-4 kept
    assert not work.exists() and not (store.path / "progress.json").exists()
    assert files_of(store.path) == files_of(ref.path)


def test_a_work_dir_holding_only_a_killed_journal_write_is_ours(tmp_path):
    """Killed while writing the very first progress.json: the rerun starts afresh instead of refusing."""
    ref = extract_store(toy_backbones(), splits(), CFG, tmp_path / "ref", progress=False, shard_bytes=SHARD)
    work = tmp_path / "work"
    work.mkdir()
    (work / ".progress.json.tmp-4242.json").write_text('{"form')
    store = extract_store(toy_backbones(), splits(), CFG, tmp_path / "out", progress=False, shard_bytes=SHARD,
                          work_dir=work)
    assert files_of(store.path) == files_of(ref.path)


def test_work_of_other_settings_is_discarded_and_a_foreign_folder_is_refused(tmp_path):
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        extract_store(toy_backbones(), splits(fail_at=20), CFG, tmp_path / "out", progress=False,
                      shard_bytes=SHARD, work_dir=work)
    other = CFG.replace(dtype="float32")  # other settings: the old work does not fit, start afresh
    loads: list[int] = []
    store = extract_store(toy_backbones(), splits(loads=loads), other, tmp_path / "out", progress=False,
                          shard_bytes=SHARD, work_dir=work)
    assert loads[0] == 0 and store.dtype == "float32"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="holds files but no progress.json, so it is not an unfinished store"):
        StoreWriter(tmp_path / "x", {"a": 8}, 4, work_dir=mine)
    assert (mine / "thesis.tex").read_text() == "precious" and not (tmp_path / "x").exists()


def test_a_writer_killed_between_manifest_and_rename_is_finished_by_the_next_run(tmp_path):
    work = tmp_path / "work"
    ref = extract_store(toy_backbones(), splits(), CFG, tmp_path / "ref", progress=False, shard_bytes=SHARD)
    real_replace = os.replace

    def die_on_rename(src, dst):
        if Path(src) == work:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", die_on_rename)
        with pytest.raises(KeyboardInterrupt):
            extract_store(toy_backbones(), splits(), CFG, tmp_path / "out", progress=False, shard_bytes=SHARD,
                          work_dir=work)
    assert not (tmp_path / "out").exists()
    loads: list[int] = []
    store = extract_store(toy_backbones(), splits(loads=loads), CFG, tmp_path / "out", progress=False,
                          shard_bytes=SHARD, work_dir=work)
    assert loads == [] and files_of(store.path) == files_of(ref.path)  # every shard was kept


def test_resumed_training_in_process_matches_and_old_checkpoints_are_rotated(tmp_path):
    from usae.core.model import UniversalSAE
    from usae.train.trainer import Trainer

    data = {"a": torch.randn(256, 8, generator=torch.Generator().manual_seed(1)),
            "b": torch.randn(256, 12, generator=torch.Generator().manual_seed(2))}
    cfg = TrainConfig(steps=30, batch_size=64, lr=1e-2, warmup_steps=2, log_every=5, checkpoint_every=4)

    def model() -> UniversalSAE:
        torch.manual_seed(0)
        return UniversalSAE({"a": 8, "b": 12}, 32, 4)

    full = model()
    Trainer(full, cfg, progress=False).fit(data)
    # a run that stops after 13 steps (checkpoints at 4, 8, 12; two kept), then a fresh trainer resumes it
    part = Trainer(model(), cfg, checkpoint_dir=tmp_path, progress=False, keep_checkpoints=2)
    stream = part._batches(data)
    for _ in range(13):
        part.train_step(next(stream))
        if part.step % cfg.checkpoint_every == 0:
            part.save_checkpoint()
    assert [p.name for p in part.checkpoints()] == ["step_000000008", "step_000000012"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / ".tmp-step_000000016-999999999").mkdir()  # debris of a killed writer
    resumed = model()
    Trainer(resumed, cfg, checkpoint_dir=tmp_path, progress=False).fit(data)
    assert not (tmp_path / ".tmp-step_000000016-999999999").exists()
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_an_interrupted_training_without_checkpoints_says_it_starts_again(tmp_path, zoo_runs, capfd):
    config = tiny_config(steps=20, checkpoint_every=0)
    runs = tmp_path / "runs"
    shutil.copytree(zoo_runs, runs)
    exp = Experiment(config, runs=runs, progress=False)
    exp.store()
    _, key = exp._train_key(config.model_names, {}, None)
    (runs / f".usae-{_stable_hash(key)}.tmp-99999999").mkdir()  # what a killed run leaves behind
    capfd.readouterr()
    exp.usae_dir()
    err = capfd.readouterr().err
    assert "interrupted" in err and "checkpoint_every" in err and "step 0" in err
    exp.usae_dir()  # the artifact exists now: nothing more is said
    assert "interrupted" not in capfd.readouterr().err
