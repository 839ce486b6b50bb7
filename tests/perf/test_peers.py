"""usae.perf.peers: every side runs one real training step at tiny shapes, the rows say what is missing, and the
memory probe runs in a fresh process."""

import math

import pytest
import torch

from usae.perf import peers
from usae.perf.peers import PEERS, SIDES, compare_peers, make_side, peer_rows, side_memory

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("side", SIDES)
def test_each_side_is_a_real_training_step(side):
    if side in PEERS and peers.peer_version(side) is None:
        pytest.skip(f"{side} is not installed (pip install -e '.[bench]')")
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    step = make_side(side, 16, 64, 4, x, torch.device("cpu"))
    before = [p.detach().clone() for p in _params_of(step)]
    step()
    step()
    if side != "floor":  # the floor has no parameters: it only does a step's unavoidable work
        after = list(_params_of(step))
        assert before and any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), side


def _params_of(step):
    """The tensors a side's step updates, found through its closure (an optimizer or our Trainer)."""
    for cell in step.__closure__ or ():
        obj = cell.cell_contents
        if isinstance(obj, torch.optim.Optimizer):
            return [p for g in obj.param_groups for p in g["params"]]
        trainer = getattr(obj, "trainer", None)
        if trainer is not None:
            return list(trainer.model.parameters())
    return []


def test_comparison_rows_at_tiny_shapes(monkeypatch):
    # the memory probe's own test is below; here a stand-in keeps the fresh processes out of the suite's time
    monkeypatch.setattr(peers, "side_memory", lambda side, dim, m, k, b, device: float(m + len(side)))
    cmp = compare_peers((64, 256), 16, 4, 48, samples=5, warmup=1, memory=True)
    installed = [p for p, v in cmp.versions.items() if v is not None]
    assert set(cmp.timings) == {64, 256}
    for m, times in cmp.timings.items():
        assert set(times.sides) == {"ours", "ours_linear", "floor", *installed}
        assert all(len(t.samples) == 5 for t in times.sides.values())
        assert set(cmp.memory[m]) == {"ours", "ours_linear", *installed}
        assert all(v >= 0 and math.isfinite(v) for v in cmp.memory[m].values())
    growth = cmp.growth()
    assert set(growth) >= {"ours", "floor"} and all(g > 0 for g in growth.values())
    rows = peer_rows(cmp)
    whats = [r["what"] for r in rows]
    assert sum("floor (fwd GEMM + sparse kernels)" in w for w in whats) == 2
    if installed:
        assert sum("vs fastest peer" in w and "linear" not in w for w in whats) == 2
        assert sum(w.startswith("memory per step") for w in whats) == 2
    for r in rows:
        assert r["entry"] == "peers" and r["ratio"] > 0
        if "samples" in r:
            assert r["samples"] == 5


def test_a_missing_peer_gives_rows_that_say_so(monkeypatch):
    monkeypatch.setattr(peers, "peer_version", lambda name: None)
    cmp = compare_peers((64,), 16, 4, 32, samples=1, warmup=0, memory=False)
    assert set(cmp.timings[64].sides) == {"ours", "ours_linear", "floor"} and cmp.fastest_peer(64) is None
    rows = peer_rows(cmp)
    missing = [r for r in rows if "not installed" in r["what"]]
    assert len(missing) == len(PEERS) and all("pip install -e '.[bench]'" in r["what"] for r in missing)
    assert all(r["passed"] is None and math.isnan(r["ratio"]) for r in missing)


def test_the_memory_probe_runs_in_a_fresh_process():
    # one step at m = 8192 makes a [512, 8192] block, gradients and Adam states of [8192, 64]: several MiB
    assert 1 < side_memory("ours", 64, 8192, 4, 512) < 1000


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="peer = 'nosuch'"):
        peers.peer_version("nosuch")
    with pytest.raises(ValueError, match="side = 'nosuch'"):
        make_side("nosuch", 8, 16, 2, torch.randn(4, 8), torch.device("cpu"))
