import json
import time

import pytest

from usae.experiment import Experiment


def test_artifact_is_built_once_and_cached(tmp_path):
    exp = Experiment("smoke", runs=tmp_path, progress=False)
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "value.txt").write_text("42")

    a = exp.artifact("thing", {"x": 1}, build)
    b = exp.artifact("thing", {"x": 1}, build)
    c = exp.artifact("thing", {"x": 2}, build)
    assert a == b != c and len(calls) == 2
    assert (a / "value.txt").read_text() == "42"
    assert json.loads((a / "key.json").read_text())["key"] == {"x": 1}
    assert a.name.startswith("thing-")


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path):
    exp = Experiment("smoke", runs=tmp_path, progress=False)

    def crash(folder):
        (folder / "half.bin").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        exp.artifact("thing", {"x": 1}, crash)
    assert list(tmp_path.iterdir()) == []
    built = exp.artifact("thing", {"x": 1}, lambda f: (f / "ok").write_text("y"))
    assert (built / "ok").exists()


def test_runs_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("USAE_RUNS", str(tmp_path / "elsewhere"))
    assert Experiment("smoke").runs == tmp_path / "elsewhere"


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="preset"):
        Experiment("nope")
    with pytest.raises(ValueError, match="ExperimentConfig"):
        Experiment(42)


def _tiny_config():
    from usae.config import ExtractConfig, TrainConfig, ZooTrainConfig, preset

    return preset("smoke").replace(
        backbones=(),
        zoo=ZooTrainConfig(models=("toy_vit", "toy_convnext"), n_train_images=64, n_val_images=32, steps=2,
                           batch_size=16),
        extract=ExtractConfig(n_train_images=64, n_val_images=16, n_stats_images=32, batch_size=16),
        train=TrainConfig(steps=40, batch_size=256, lr=3e-2, warmup_steps=5, log_every=20))


def test_side_by_side_training_equals_one_thread_training_in_turn(tmp_path, one_thread):
    """Worker processes (one thread each) write the same weights as training in turn on one thread, into the
    artifacts that usae() / independent_sae() then load; a second call trains nothing."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from usae import Training

    side, serial = tmp_path / "side", tmp_path / "serial"
    Experiment(_tiny_config(), runs=side, progress=False).store()
    shutil.copytree(side, serial)                                     # the same zoo and store for both
    jobs = [Training(), Training(init="official"), Training(model="toy_vit", changes=(("steps", 30),))]
    exp = Experiment(_tiny_config(), runs=side, progress=False)
    exp.train_side_by_side(jobs, workers=3)
    trained = sorted(p.name for p in side.iterdir() if p.name.startswith(("usae-", "sae-")))
    assert len(trained) == 3
    ref = Experiment(_tiny_config(), runs=serial, progress=False)
    for job in jobs:
        job.train(ref)
    assert trained == sorted(p.name for p in serial.iterdir() if p.name.startswith(("usae-", "sae-")))
    for name in trained:
        a, b = load_file(side / name / "model.safetensors"), load_file(serial / name / "model.safetensors")
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], name
    started = time.perf_counter()
    exp.train_side_by_side(jobs)                                      # all cached: nothing to start
    assert time.perf_counter() - started < 5
    assert sorted(p.name for p in side.iterdir() if p.name.startswith(("usae-", "sae-"))) == trained


def test_side_by_side_training_rejects_bad_jobs(tmp_path):
    from usae import Training

    exp = Experiment(_tiny_config(), runs=tmp_path / "runs", progress=False)
    with pytest.raises(ValueError, match="toy_mixer"):
        exp.train_side_by_side([Training(model="toy_mixer")])
    with pytest.raises(ValueError, match="list of Training"):
        exp.train_side_by_side(Training())
    assert not any(tmp_path.joinpath("runs").glob("zoo-*"))          # rejected before any work
