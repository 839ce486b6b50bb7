import json
from pathlib import Path

import pytest
import torch

from usae.config import ToyWorldConfig, ZooTrainConfig
from usae.data import toyzoo, toyzoo_build
from usae.data.toyworld import ToyWorld

TINY = ZooTrainConfig(models=("toy_mixer",), n_train_images=96, n_val_images=64, steps=6, batch_size=32, lr=3e-3)


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(ToyWorldConfig())


def test_every_model_trains_into_an_existing_folder(world: ToyWorld, tmp_path: Path):
    cfg = ZooTrainConfig(n_train_images=32, n_val_images=32, steps=2, batch_size=8)
    report = toyzoo_build.train_toy_zoo(world, cfg, tmp_path, progress=False)
    assert set(report) == set(cfg.models)
    for name, tasks in toyzoo.TASKS.items():
        assert set(report[name]["chance"]) == {t.name for t in tasks}
        assert (tmp_path / f"{name}.safetensors").is_file()
        assert toyzoo.load_toy_heads(name, tmp_path).heads[tasks[-1].name].out_features == tasks[-1].n_outputs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_input_raises(world: ToyWorld, tmp_path: Path):
    with pytest.raises(ValueError, match="toy_resnet"):
        toyzoo_build.train_toy_zoo(world, ZooTrainConfig(models=("toy_resnet",)), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="ToyWorld"):
        toyzoo_build.train_toy_zoo("world", TINY, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_models_trained_in_worker_processes_equal_one_thread_training(world, tmp_path, one_thread):
    """One-thread worker processes (one per model, the default on a multi-core CPU) give the same weights as
    training the models in turn on one thread."""
    from safetensors.torch import load_file

    cfg = TINY.replace(models=("toy_mixer", "toy_vit", "toy_convnext"))
    parallel = toyzoo_build.train_toy_zoo(world, cfg, tmp_path / "par", progress=False, workers=3)
    serial = toyzoo_build.train_toy_zoo(world, cfg, tmp_path / "ser", progress=False, workers=1)
    assert list(parallel) == list(cfg.models)
    for name in cfg.models:
        a, b = load_file(tmp_path / "par" / f"{name}.safetensors"), load_file(tmp_path / "ser" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert parallel[name]["final_loss"] == serial[name]["final_loss"]
    assert not list((tmp_path / "par").glob("*.report.json"))
    with pytest.raises(ValueError, match="workers = 0 is not valid"):
        toyzoo_build.train_toy_zoo(world, cfg, tmp_path / "bad", progress=False, workers=0)


def test_workers_beyond_the_cores_yield_to_the_longest_remaining_ones(tmp_path):
    assert toyzoo_build._yielding({"a": 300.0, "b": 150.0, "c": 160.0}, cores=2) == {"b", "c"}
    assert toyzoo_build._yielding({"a": 100.0, "b": 150.0, "c": 160.0, "d": 1.0}, cores=3) == {"a", "d"}
    assert toyzoo_build._yielding({"a": 300.0, "b": 150.0}, cores=2) == set()      # a core each: nobody yields
    for name, (done, steps, cpu) in {"a": (24, 99, 12.0), "b": (49, 49, 3.0)}.items():
        (tmp_path / f"{name}.progress.json").write_text(json.dumps({"done": done, "steps": steps, "cpu_seconds": cpu}))
    assert toyzoo_build._remaining_cpu(tmp_path, ["a", "b"]) == {"a": 12.0 / 24 * 75, "b": 0.0}
    assert toyzoo_build._remaining_cpu(tmp_path, ["a", "b", "c"]) is None          # c has not reported yet
