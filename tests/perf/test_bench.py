"""usae.perf.step: the official reference step equals our Trainer's step; the entry and its helpers run at
tiny shapes."""

import math

import pytest
import torch

from usae.config import TrainConfig
from usae.core.model import UniversalSAE
from usae.perf import runner as bench
from usae.perf.anatomy import PART_KINDS, step_flops, time_parts
from usae.perf.reference import OfficialReference
from usae.perf.step import bench_step, scaling_sweep
from usae.perf.timing import measure_steps
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
    assert list(bench.ENTRIES) == ["extract", "store", "step", "stats", "cam"]
    assert all(callable(fn) for fn in bench.ENTRIES.values())
    rows = bench_step(True, "cpu", dims=DIMS, n_latents=64, k=4, batch_size=64, repeats=1, fit_steps=2)
    assert len(rows) == 6  # the all-dead AuxK row is timed, not only built
    assert sum("all dead" in r["what"] for r in rows) == 1
    for r in rows:
        assert r["entry"] == "step" and math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["target"] is not None
        assert r["passed"] == (r["ratio"] >= r["target"])
    assert rows[-1]["unit"] == "tok/s"


def test_measurements_and_flop_counts_at_tiny_shapes():
    times = measure_steps(DIMS, 64, 4, 32, repeats=1, variants=("ref_none", "ours_auxk", "gemm"), progress=False)
    assert set(times) == {"ref_none", "ours_auxk", "gemm"} and all(t > 0 for t in times.values())
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
    times = measure_steps(DIMS, 64, 4, 32, repeats=2, variants=("ours_auxk", "ours_auxk_all"), progress=False)
    assert set(times) == {"ours_auxk", "ours_auxk_all"} and all(t > 0 for t in times.values())
