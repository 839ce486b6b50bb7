"""TrainHistory: bounded per-step series and log (thinning), JSON and array round trips, and the constant cost
of a checkpoint at paper scale (a simulated 1.2 M-step run)."""

import json
import shutil

import pytest
import torch

from usae.config import TrainConfig
from usae.core.model import UniversalSAE
from usae.train.history import LogEntry, TrainHistory
from usae.train.trainer import Trainer

NAMES = ["dinov2", "siglip", "vit"]
PAPER_STEPS = 1_201_094  # the paper preset's steps


def entry(step):
    return LogEntry(step=step, loss=1.0 / (1 + step), r2=[[0.5] * 3] * 3, r2_cross=0.5,
                    dead_fraction={n: 0.1 for n in NAMES}, dead_in_all=0.01)


def simulated(steps, log_every=100, **kw):
    """A history filled as a run of ``steps`` steps fills it (values are functions of the step)."""
    h = TrainHistory(NAMES, **kw)
    for s in range(steps):
        h.append(s, s % 3, 1e-4 + s * 1e-12, float(s), [s + 0.25, s + 0.5, s + 0.75], [0.0, 0.0, float(-s)],
                 [s // 3] * 3)
        if (s + 1) % log_every == 0:
            h.add_log(entry(s + 1))
    return h


def test_short_runs_keep_every_step():
    h = simulated(1000)
    assert h.complete and h.step == list(range(1000)) and len(h.log) == 10 and h.log_seen == 10


@pytest.fixture(scope="module")
def paper_history():
    return simulated(PAPER_STEPS)


def test_paper_scale_history_is_bounded_and_evenly_thinned(paper_history):
    h = paper_history
    assert h.max_points // 2 <= len(h.step) <= h.max_points and not h.complete
    assert h.stride & (h.stride - 1) == 0 and all(s % h.stride == 0 for s in h.step)
    assert h.step == list(range(0, PAPER_STEPS, h.stride))          # every multiple of stride: the whole run
    assert h.loss == [float(s) for s in h.step] and h.model == [s % 3 for s in h.step]   # real steps, not means
    assert h.recon["vit"] == [s + 0.75 for s in h.step] and h.aux["vit"] == [float(-s) for s in h.step]
    assert h.picks == [[s // 3] * 3 for s in h.step]
    assert len(h.log) <= h.max_log and h.log_seen == PAPER_STEPS // 100
    assert [e.step for e in h.log] == [100 * (1 + i * h.log_stride) for i in range(len(h.log))]


def test_schedules_of_a_thinned_history(paper_history):
    from usae.train.curves import schedules
    from usae.train.trainer import learning_rate

    cfg = TrainConfig(steps=PAPER_STEPS, warmup_steps=40_036, lr=3e-4, final_lr=1e-6)
    lrs = schedules(cfg, paper_history)
    t = len(lrs.step) // 2
    assert lrs.shared[t] == learning_rate(cfg, int(lrs.step[t]))
    assert lrs.per_model["vit"][t] == learning_rate(cfg, int(lrs.step[t]) // 3)


def test_round_trips(paper_history):
    h = paper_history
    again = TrainHistory.from_dict(json.loads(json.dumps(h.to_dict())))
    assert again == h
    tensors, rest = h.arrays()
    assert TrainHistory.from_arrays(tensors, json.loads(json.dumps(rest))) == h
    # a history continued after the round trip thins exactly as the original would have
    a, b = simulated(40_000, max_points=1024), TrainHistory.from_dict(simulated(25_000, max_points=1024).to_dict())
    for s in range(25_000, 40_000):
        b.append(s, s % 3, 1e-4 + s * 1e-12, float(s), [s + 0.25, s + 0.5, s + 0.75], [0.0, 0.0, float(-s)],
                 [s // 3] * 3)
        if (s + 1) % 100 == 0:
            b.add_log(entry(s + 1))
    assert a == b


def test_checkpoint_cost_does_not_grow_with_the_run(tmp_path, paper_history):
    """The bytes a checkpoint writes for the history are the same at 60 k and at 1.2 M steps (bounded by
    max_points and max_log), and resuming restores the thinned history exactly."""
    sizes = {}
    for steps, history in ((60_000, simulated(60_000)), (PAPER_STEPS, paper_history)):
        trainer = Trainer(UniversalSAE({n: 4 for n in NAMES}, 8, 2), TrainConfig(steps=PAPER_STEPS + 1, batch_size=4),
                          progress=False, checkpoint_dir=tmp_path / str(steps))
        trainer.history, trainer.step = history, steps
        path = trainer.save_checkpoint()
        sizes[steps] = sum(f.stat().st_size for f in path.iterdir())
        again = Trainer(UniversalSAE({n: 4 for n in NAMES}, 8, 2), TrainConfig(steps=PAPER_STEPS + 1, batch_size=4),
                        progress=False, checkpoint_dir=tmp_path / str(steps))
        again.resume()
        assert again.history == history and again.step == steps
    assert sizes[PAPER_STEPS] < 1.1 * sizes[60_000] and sizes[PAPER_STEPS] < 4 * 2**20, sizes


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="max_points"):
        TrainHistory(NAMES, max_points=1)
    with pytest.raises(ValueError, match="stride"):
        TrainHistory(NAMES, stride=0)


def test_a_trained_history_logs_window_means(tmp_path):
    """The log's loss is the mean of the step losses since the previous entry, across a checkpoint and resume."""
    data = {n: torch.randn(256, 4, generator=torch.Generator().manual_seed(j)) for j, n in enumerate(NAMES)}
    cfg = TrainConfig(steps=10, batch_size=32, log_every=4, checkpoint_every=6, warmup_steps=0)
    torch.manual_seed(0)
    model = UniversalSAE({n: 4 for n in NAMES}, 8, 2)
    h = Trainer(model, cfg, progress=False).fit(data)
    means = [sum(h.loss[a:b]) / (b - a) for a, b in ((0, 4), (4, 8), (8, 10))]
    assert [e.loss for e in h.log] == means
    torch.manual_seed(0)
    first = Trainer(UniversalSAE({n: 4 for n in NAMES}, 8, 2), cfg, progress=False, checkpoint_dir=tmp_path)
    first.fit(data)
    shutil.rmtree(tmp_path / "step_000000010")               # as if killed after the step-6 checkpoint
    resumed = Trainer(UniversalSAE({n: 4 for n in NAMES}, 8, 2), cfg, progress=False, checkpoint_dir=tmp_path)
    assert json.dumps(resumed.fit(data).to_dict()) == json.dumps(h.to_dict())   # (json: NaN == NaN)
