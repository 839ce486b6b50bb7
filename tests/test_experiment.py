import json

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
