"""usae.perf.step: the official reference step equals our Trainer's step; the entry and its helpers run at
tiny shapes."""

import math
import subprocess
import sys
import time

import pytest
import torch

from usae.config import TrainConfig
from usae.core.model import UniversalSAE
from usae.perf import runner as bench
from usae.perf import timing
from usae.perf.anatomy import PART_KINDS, step_flops, time_parts
from usae.perf.reference import OfficialReference
from usae.perf.rows import format_table, row
from usae.perf.step import bench_step, scaling_sweep
from usae.perf.timing import interleaved, measure_steps
from usae.train.trainer import Trainer, learning_rate

DIMS = {"a": 6, "b": 10, "c": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


def freeze_linear_bias(modules):
    # Before BatchNorm the Linear bias has a true gradient of 0; Adam turns rounding noise (which differs
    # between a dense and a sparse backward) into ±lr steps, which then move BN's running mean. Freezing it
    # in both implementations keeps every other parameter and buffer comparable to fp32 tolerance.
    for module in modules:
        module.linear.bias.requires_grad_(False)


@pytest.mark.parametrize("aux", ["official", "none"])
def test_reference_step_equals_the_trainer(aux):
    torch.manual_seed(0)
    model = UniversalSAE(DIMS, 24, 3)
    ref = OfficialReference.from_usae(model, aux=aux == "official")
    freeze_linear_bias(model.coders)
    freeze_linear_bias(ref.saes)
    cfg = TrainConfig(steps=6, batch_size=32, warmup_steps=2, lr=1e-2, final_lr=1e-4, aux=aux, update="paper",
                      log_every=6)
    gen = torch.Generator().manual_seed(1)
    batches = [{n: torch.randn(32, d, generator=gen) for n, d in DIMS.items()} for _ in range(cfg.steps)]
    history = Trainer(model, cfg, progress=False).fit(batches)
    assert len(set(history.model)) > 1, "the check needs more than one selected model"
    picks = zip(batches, history.model, strict=True)
    losses = [ref.step(b, i, lr=learning_rate(cfg, t)) for t, (b, i) in enumerate(picks)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(history.loss), rtol=1e-5, atol=1e-6)
    expected = ref.state_dict()
    assert set(expected) == set(model.state_dict())
    for key, got in model.state_dict().items():
        torch.testing.assert_close(got, expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_reference_updates_only_the_selected_model_and_clips_every_one():
    torch.manual_seed(0)
    ref = OfficialReference(DIMS, 24, 3, aux=True)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    batch = {n: torch.randn(16, d) for n, d in DIMS.items()}
    ref.step(batch, 1)
    changed = {k for k, v in ref.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("coders.1.") for k in changed), changed
    # every decoder received a gradient (official: all decoders are in the graph), the encoders of others none
    assert all(s.dictionary.grad is not None for s in ref.saes)
    assert ref.saes[0].linear.weight.grad is None and ref.saes[2].linear.weight.grad is None
    assert all(s.dictionary.grad.norm() <= 1.0 + 1e-5 for s in ref.saes)


def test_the_entry_list_is_explicit_and_the_step_entry_runs_at_tiny_shapes():
    assert list(bench.ENTRIES) == ["extract", "store", "step", "peers", "stats", "cam"]
    assert all(callable(fn) for fn in bench.ENTRIES.values())
    rows = bench_step(True, "cpu", dims=DIMS, n_latents=64, k=4, batch_size=64, samples=5, fit_steps=2)
    assert len(rows) == 6  # the all-dead AuxK row is timed, not only built
    assert sum("all dead" in r["what"] for r in rows) == 1
    assert sum(r["what"].startswith("floor (fwd GEMM + sparse kernels)") for r in rows) == 1
    for r in rows:
        assert r["entry"] == "step" and math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["target"] is not None
        # a noisy run (a busy machine) is not judged; a quiet one is judged against the target
        assert r["passed"] == (None if r.get("noisy") else r["ratio"] >= r["target"])
    for r in rows[:-1]:
        assert r["samples"] == 5 and r["ours_spread"][0] <= r["ours"] <= r["ours_spread"][1]
        assert r["reference_spread"][0] <= r["reference"] <= r["reference_spread"][1]
    assert rows[-1]["unit"] == "tok/s"


def test_measurements_and_flop_counts_at_tiny_shapes():
    times = measure_steps(DIMS, 64, 4, 32, samples=1, warmup=1, variants=("ref_none", "ours_auxk", "floor"),
                          progress=False)
    assert set(times.sides) == {"ref_none", "ours_auxk", "floor"} and all(t > 0 for t in times.medians().values())
    with pytest.raises(ValueError, match="gemm"):
        measure_steps(DIMS, 64, 4, 32, samples=1, variants=("gemm",), progress=False)
    for aux in ("official", "auxk"):
        parts = time_parts(DIMS, 64, 4, 32, aux=aux, progress=False)
        for impl in ("reference", "ours"):
            mine = {r["part"]: r["seconds"] for r in parts if r["impl"] == impl}
            assert set(mine) == {*PART_KINDS, "whole step"} and all(v >= 0 for v in mine.values())
            assert mine["dense GEMM, forward"] > 0 and mine["optimizer (clip + AdamW)"] > 0, mine
            assert mine["TopK / sort"] > 0 and mine["whole step"] > 0, mine
    sweep = scaling_sweep(DIMS, 64, 4, 32, batch_sizes=(16, 32), n_models=(1, 4), progress=False)
    assert [(r["vary"], r["value"], r["impl"]) for r in sweep][::2] == [("B", 16, "reference"), ("B", 32, "reference"),
                                                                       ("M", 1, "reference"), ("M", 4, "reference")]
    with pytest.raises(ValueError, match="aux"):
        scaling_sweep(DIMS, 64, 4, 32, batch_sizes=(16,), aux="auxk")
    flops = {r["part"]: r for r in step_flops(aux="none")}
    assert flops["decode into all M"]["reference"] / flops["decode into all M"]["ours"] == 6144 / 32
    assert flops["total"]["ours"] < flops["total"]["reference"] / 5
    assert "auxiliary loss" not in flops and "auxiliary loss" in {r["part"] for r in step_flops(aux="official")}


def test_the_all_dead_auxk_variant_is_timed():
    times = measure_steps(DIMS, 64, 4, 32, samples=2, variants=("ours_auxk", "ours_auxk_all"), progress=False)
    assert set(times.sides) == {"ours_auxk", "ours_auxk_all"}
    assert all(len(t.samples) == 2 and min(t.samples) > 0 for t in times.sides.values())


# -- the fair harness ---------------------------------------------------------------------------------------
def test_interleaved_runs_the_sides_in_rounds_with_the_same_warmup():
    calls = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, samples=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert all(len(t.samples) == 3 and len(t.other_cores) == 3 for t in timings.sides.values())
    with pytest.raises(ValueError, match="samples = 0"):
        interleaved({"a": lambda: None}, samples=0)


def test_the_quiet_machine_guard_sees_other_processes(monkeypatch):
    # another process burns 1.5 cores while each 0.1 s sample runs: the run is noisy and no row passes
    clock = {"busy": 100.0}

    def busy_seconds():
        clock["busy"] += 0.075  # half of 0.15 s of other work, read at the start and end of each sample
        return clock["busy"]

    monkeypatch.setattr(timing, "_busy_seconds", busy_seconds)
    monkeypatch.setattr(timing, "GUARD_MIN_SECONDS", 0.0)
    t = interleaved({"x": lambda: time.sleep(0.1)}, samples=2, warmup=0)
    assert t.noisy is True and 0.5 < t.other_cores < 1.6
    r = row("step", "x", 1.0, 9.0, "s", 9.0, 2.0, noisy=t.noisy)
    assert r["passed"] is None and "noisy" in format_table([r])
    monkeypatch.setattr(timing, "_busy_seconds", lambda: 100.0)  # nothing else runs: quiet, judged
    quiet = interleaved({"x": lambda: time.sleep(0.01)}, samples=2, warmup=0)
    assert quiet.noisy is False and quiet.other_cores == 0.0
    assert row("step", "x", 1.0, 9.0, "s", 9.0, 2.0, noisy=quiet.noisy)["passed"] is True
    monkeypatch.setattr(timing, "_busy_seconds", lambda: None)  # the machine does not tell
    assert interleaved({"x": lambda: None}, samples=1, warmup=0).noisy is None
    monkeypatch.setattr(timing, "_busy_seconds", busy_seconds)
    monkeypatch.setattr(timing, "GUARD_MIN_SECONDS", 1.0)  # too short a run for the tick counts to tell
    assert interleaved({"x": lambda: time.sleep(0.1)}, samples=2, warmup=0).noisy is None


def test_the_guard_measures_a_real_busy_process():
    if timing._busy_seconds() is None:
        pytest.skip("no /proc/stat here")
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 8: pass"])
    try:
        time.sleep(0.3)
        t = interleaved({"sleep": lambda: time.sleep(0.8)}, samples=3, warmup=0)  # 2.4 s > GUARD_MIN_SECONDS
    finally:
        burner.kill()
        burner.wait()
    assert t.other_cores > 0.5, t.other_cores  # one spinning process is about one core
    assert t.noisy is True
