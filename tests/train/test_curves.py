import json

import numpy as np
import pytest

from usae.config import TrainConfig
from usae.train.curves import dead_fractions, logged_r2, loss_per_model, schedules, smooth
from usae.train.history import LogEntry, TrainHistory


def test_smooth_is_a_trailing_mean():
    x = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    expected = [np.mean(x[max(0, i - 2):i + 1]) for i in range(len(x))]
    assert np.allclose(smooth(x, 3), expected)
    assert np.allclose(smooth(x, 1), x)


def _history():
    mats = [np.array([[0.1, 0.0], [0.0, 0.2]]), np.array([[0.8, 0.4], [0.5, 0.9]])]
    log = [LogEntry(2, 3.5, mats[0].tolist(), 0.0, {"a": 0.5, "b": 0.1}, 0.1),
           LogEntry(4, 1.5, mats[1].tolist(), 0.45, {"a": 0.2, "b": 0.0}, 0.0)]
    return TrainHistory(["a", "b"], step=[1, 2, 3, 4], model=[0, 1, 1, 0], lr=[1e-3] * 4, loss=[4.0, 3.0, 2.0, 1.0],
                        log=log)


def test_history_curves():
    h = _history()
    per_model = loss_per_model(h, window=1)
    assert per_model["a"][0].tolist() == [1, 4] and per_model["a"][1].tolist() == [4.0, 1.0]
    r2 = logged_r2(h)
    assert np.allclose(r2["self"], [0.15, 0.85]) and np.allclose(r2["cross"], [0.0, 0.45])
    assert dead_fractions(h)["a"][1].tolist() == [0.5, 0.2]
    assert h.picked("a") == [0, 3] and h.recon == {"a": [], "b": []}


def test_history_round_trips_through_json_data():
    h = _history()
    h.seconds = 1.5
    again = TrainHistory.from_dict(json.loads(json.dumps(h.to_dict())))
    assert again == h
    assert "run" not in h.to_dict()
    with pytest.raises(ValueError, match="names"):
        TrainHistory.from_dict({"loss": [1.0]})
    with pytest.raises(ValueError, match="'c' is not valid"):
        h.picked("c")


def test_official_schedule_never_finishes_but_ours_does():
    cfg = TrainConfig(steps=300, warmup_steps=30, lr=3e-4, final_lr=1e-6)
    chosen = np.random.default_rng(0).integers(0, 3, size=300).tolist()
    old = TrainHistory(["a", "b", "c"], step=list(range(300)), model=chosen)      # no pick counts: derived
    counts = [[chosen[:t].count(i) for i in range(3)] for t in range(300)]
    for h in (old, TrainHistory(["a", "b", "c"], step=list(range(300)), model=chosen, picks=counts)):
        assert np.array_equal(schedules(cfg, h).per_model["b"], schedules(cfg, old).per_model["b"])
    lrs = schedules(cfg, old)
    assert np.isclose(lrs.shared[0], cfg.final_lr) and lrs.shared[-1] < 2e-6
    assert list(lrs.per_model) == ["a", "b", "c"]
    for name in "abc":  # stepped ~1/3 as often: still well above final_lr at the end
        assert lrs.per_model[name][-1] > 1e-4
