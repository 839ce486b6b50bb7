"""usae.stats.levels: recovery per factor and level, the paper's bar as a detector, linear probes (brute force)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from usae.stats.levels import bar_detection, factor_recovery, level_recovery, linear_probe


def test_factor_and_level_recovery_match_brute_force(planted_gt):
    gt = planted_gt()
    design = [SimpleNamespace(factor="a", level="low", models=("x", "y", "z"), expected="universal"),
              SimpleNamespace(factor="b", level="low", models=("y",), expected="unique"),
              SimpleNamespace(factor="c", level="high", models=("x", "y", "z"), expected="universal")]
    thr = 0.8
    rows = factor_recovery(gt, design, thr)
    for d, r in zip(design, rows, strict=True):
        a = gt.auroc[d.factor].nan_to_num(-1.0)                      # [M, m, V]
        present = [v for v in range(a.shape[2]) if gt.n_positive[d.factor][v] > 0]
        assert r.values == len(present)
        assert r.universal == sum(any(all(a[i, k, v] >= thr for i in range(3)) for k in range(12)) for v in present)
        assert r.per_model == tuple(sum(any(a[i, k, v] >= thr for k in range(12)) for v in present) for i in range(3))
        outside = [c for n, c in zip(gt.names, r.per_model, strict=True) if n not in d.models]
        assert r.outside == max(outside, default=0)
        assert r.row()["design"] == d.expected and r.row()["x"] == r.per_model[0]
    levels = {lv.level: lv for lv in level_recovery(rows)}
    assert list(levels) == ["low", "high"]
    assert levels["low"].universal_factors == ("a",) and levels["low"].specific_factors == ("b",)
    assert levels["low"].universal_share == rows[0].universal / rows[0].values
    assert levels["low"].specific_outside == rows[1].outside
    assert levels["high"].universal_values == 3 and levels["high"].specific_outside == 0
    with pytest.raises(ValueError, match="'d'"):
        factor_recovery(gt, [SimpleNamespace(factor="d", level="low", models=(), expected="none")])


def test_best_universal_and_value_names(planted_gt):
    gt = planted_gt(1)
    v, k, auc = gt.best_universal("a")
    worst = gt.auroc["a"].min(0).values                               # [m, V]
    assert auc == pytest.approx(float(worst.max())) and float(worst[k, v]) == pytest.approx(auc)
    assert gt.value_name("a", 1) == "a1" and gt.value_name("c", 2) == "2"


def test_bar_detection_matches_brute_force(planted_gt):
    gt = planted_gt(2)
    g = torch.Generator().manual_seed(3)
    fires = torch.randint(0, 5, (3, 12), generator=g)
    fires[:, 0] = 0                                                    # concept 0 never fired
    stats = SimpleNamespace(never_fired=fires.sum(0) == 0, entropy=torch.rand(12, generator=g).double() * 0.3 + 0.75,
                            cofire_proportion=torch.rand(3, 12, generator=g).double())
    det = bar_detection(gt, stats, min_entropy=0.9, auroc=0.85, thresholds=torch.tensor([0.0, 0.2, 0.5, 0.9]))
    truth = [bool(~stats.never_fired[k]) and max(float(gt.auroc[f][:, k].min(0).values.nan_to_num(-1).max())
                                                 for f in gt.factors) >= 0.85 for k in range(12)]
    assert det.n_true == sum(truth) and det.truly_universal.tolist() == [k for k in range(12) if truth[k]]
    for i, t in enumerate([0.0, 0.2, 0.5, 0.9]):
        kept = [k for k in range(12) if not stats.never_fired[k] and stats.entropy[k] > 0.9
                and float(stats.cofire_proportion[:, k].min()) > t]
        tp = sum(truth[k] for k in kept)
        assert int(det.kept[i]) == len(kept)
        if kept:
            assert float(det.precision[i]) == pytest.approx(tp / len(kept))
        else:
            assert math.isnan(float(det.precision[i]))
        assert float(det.recall[i]) == pytest.approx(tp / det.n_true)
        assert float(det.f1[i]) == pytest.approx(2 * tp / (len(kept) + det.n_true) if tp else 0.0)
    assert det.at(0.49)[2] == int(det.kept[2])
    assert float(det.best_threshold) in (0.0, 0.2, 0.5, 0.9)


class TinyStore:
    """A store stand-in: tokens whose first coordinate encodes the label (linearly separable)."""

    def __init__(self, n: int = 400, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dims = {"x": 5}
        self._rows, self._labels = {}, {}
        for split in ("train", "val"):
            lab = torch.randint(-1, 3, (n,), generator=g)
            x = torch.randn(n, 5, generator=g) * 0.05
            x[:, :3] += torch.nn.functional.one_hot(lab.clamp(min=0), 3).float() * (lab >= 0).float()[:, None]
            self._rows[split], self._labels[split] = x, {"f": lab.numpy(), "g": np.zeros(n, dtype=np.int64)}

    def n_rows(self, split: str) -> int:
        return len(self._rows[split])

    def rows(self, split: str, model: str, start: int, stop: int) -> torch.Tensor:
        return self._rows[split][start:stop]

    def labels(self, split: str) -> dict:
        return self._labels[split]


def test_linear_probe_finds_a_planted_linear_factor():
    store = TinyStore()
    r = linear_probe(store, "x", "f", batch_size=64)                  # several batches
    val = store.labels("val")["f"]
    assert r.accuracy == 1.0 and r.n_eval == int((val >= 0).sum())
    assert r.chance == pytest.approx(np.bincount(val[val >= 0]).max() / r.n_eval)
    with pytest.raises(ValueError, match="'h'"):
        linear_probe(store, "x", "h")
    with pytest.raises(ValueError, match="fewer than two"):
        linear_probe(store, "x", "g")


def test_best_detectors_match_brute_force(planted_gt):
    from usae.stats.levels import best_detectors

    gt = planted_gt(4)
    det = best_detectors(gt, "c")                                       # value 3 has no positive token
    assert det.values == ("0", "1", "2") and det.concepts.shape == (3, 3) == det.auroc.shape
    for i in range(3):
        for v in range(3):
            col = gt.auroc["c"][i, :, v]
            assert int(det.concepts[i, v]) == int(col.argmax()) and float(det.auroc[i, v]) == float(col.max())
    assert det.distinct == len({int(gt.auroc["c"][i, :, v].argmax()) for i in range(3) for v in range(3)})
    rows = det.rows()
    assert [r["c"] for r in rows] == ["0", "1", "2"] and rows[0]["x"].startswith(f"c{int(det.concepts[0, 0])} (")
    with pytest.raises(ValueError, match="'d'"):
        best_detectors(gt, "d")
