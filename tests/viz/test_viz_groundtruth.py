"""usae.viz.groundtruth: the chapter-8 figures draw what the truth statistics hold."""

from types import SimpleNamespace

import plotly.graph_objects as go
import torch

from usae.stats.levels import bar_detection, factor_recovery
from usae.viz import groundtruth as vg


def test_level_recovery_figure_draws_each_model_and_the_universal_share(planted_gt):
    gt = planted_gt()
    design = [SimpleNamespace(factor="a", level="low", models=("x", "y", "z"), expected="universal"),
              SimpleNamespace(factor="b", level="low", models=("y",), expected="unique"),
              SimpleNamespace(factor="c", level="high", models=("x", "y", "z"), expected="universal")]
    rows = factor_recovery(gt, design, 0.8)
    fig = vg.level_recovery_figure(rows)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert [b.name for b in bars] == ["x: some concept", "y: some concept", "z: some concept"]
    for i, b in enumerate(bars):
        assert list(b.y) == [r.per_model[i] / r.values for r in rows]
    assert list(bars[0].text) == ["needs it", "", "needs it"] and list(bars[1].text) == ["needs it"] * 3
    assert list(fig.data[-1].y) == [r.universal_share for r in rows]
    assert list(fig.data[-1].x[0]) == ["low", "low", "high"]


def test_bar_detection_figure_draws_the_three_curves_over_the_thresholds(planted_gt):
    gt = planted_gt(2)
    stats = SimpleNamespace(never_fired=torch.zeros(12, dtype=torch.bool), entropy=torch.full((12,), 0.95).double(),
                            cofire_proportion=torch.rand(3, 12, generator=torch.Generator().manual_seed(1)).double())
    thresholds = torch.tensor([0.0, 0.25, 0.5, 0.75])
    det = bar_detection(gt, stats, min_entropy=0.9, auroc=0.85, thresholds=thresholds)
    fig = vg.bar_detection_figure(det)
    assert [t.name for t in fig.data] == ["precision", "recall", "F1"]
    assert list(fig.data[1].x) == thresholds.tolist() and list(fig.data[1].y) == det.recall.tolist()
    assert len(fig.layout.shapes) == 2 and f"{det.n_true} truly" in fig.layout.title.text
