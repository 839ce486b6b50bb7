import numpy as np

from usae.config import TrainConfig
from usae.curves import dead_fractions, logged_r2, loss_per_model, schedules, smooth


def test_smooth_is_a_trailing_mean():
    x = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    expected = [np.mean(x[max(0, i - 2):i + 1]) for i in range(len(x))]
    assert np.allclose(smooth(x, 3), expected)
    assert np.allclose(smooth(x, 1), x)


def _history():
    mats = [np.array([[0.1, 0.0], [0.0, 0.2]]), np.array([[0.8, 0.4], [0.5, 0.9]])]
    return {"names": ["a", "b"], "step": [1, 2, 3, 4], "model": [0, 1, 1, 0], "loss": [4.0, 3.0, 2.0, 1.0],
            "log": [{"step": 2, "r2": mats[0].tolist(), "dead_fraction": {"a": 0.5, "b": 0.1}},
                    {"step": 4, "r2": mats[1].tolist(), "dead_fraction": {"a": 0.2, "b": 0.0}}]}


def test_history_curves():
    h = _history()
    per_model = loss_per_model(h, window=1)
    assert per_model["a"][0].tolist() == [1, 4] and per_model["a"][1].tolist() == [4.0, 1.0]
    r2 = logged_r2(h)
    assert np.allclose(r2["self"], [0.15, 0.85]) and np.allclose(r2["cross"], [0.0, 0.45])
    assert dead_fractions(h)["a"][1].tolist() == [0.5, 0.2]


def test_official_schedule_never_finishes_but_ours_does():
    cfg = TrainConfig(steps=300, warmup_steps=30, lr=3e-4, final_lr=1e-6)
    chosen = np.random.default_rng(0).integers(0, 3, size=300)
    lrs = schedules(cfg, chosen, 3)
    assert np.isclose(lrs["global"][0], cfg.final_lr) and lrs["global"][-1] < 2e-6
    for i in range(3):  # stepped ~1/3 as often: still well above final_lr at the end
        assert lrs[f"per_model[{i}]"][-1] > 1e-4
