"""Figures that judge concepts against the toy world's truth (chapter 8): per-token AUROC heatmaps, the
factor values recovered per level and per value, the paper's metrics against the truth, and the paper's
universality bar as a detector. Statistics come from ``usae.stats.groundtruth`` and ``usae.stats.levels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
import torch

from usae.stats import firing
from usae.viz.concepts import concept_text
from usae.viz.core import PALETTE

__all__ = ["auroc_heatmap", "recovery_figure", "truth_scatter", "bar_detection_figure", "level_recovery_figure"]


def _value_label(gt: Any, factor: str, value: int) -> str:
    names = gt.value_names.get(factor) or ()
    return f"{factor}:{names[value] if value < len(names) else value}"


def auroc_heatmap(gt: Any, concepts: Sequence[int], model: str | None = None, title: str | None = None) -> go.Figure:
    """AUROC of the given concepts (rows) against every factor value (columns) of ``model`` or the worst model."""
    ks = [int(k) for k in concepts]
    cols, blocks = [], []
    for f in gt.factors:
        t = gt.table(f, model)[ks]
        cols += [_value_label(gt, f, v) for v in range(t.shape[1])]
        blocks.append(t)
    z = torch.cat(blocks, 1).numpy()
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=[f"c{k}" for k in ks], zmin=0.5, zmax=1.0, colorscale="Viridis",
                               hovertemplate="%{y} vs %{x}: AUROC %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_layout(title=title or f"Per-token AUROC vs toy truth ({model or 'worst model'})",
                      height=140 + 18 * len(ks), margin=dict(l=70, r=20, t=60, b=110))
    return fig


def recovery_figure(gt: Any, factors: Sequence[str] | None = None) -> go.Figure:
    """Per factor value: the best AUROC of any concept in each model (bars) and of the best single concept in
    its worst model (black marker: a universal detector scores high there)."""
    factors = list(factors or gt.factors)
    fig = go.Figure()
    x = [_value_label(gt, f, v) for f in factors for v in range(gt.auroc[f].shape[2])]
    for i, name in enumerate(gt.names):
        y = torch.cat([gt.best_concept_per_value(f, name)[1] for f in factors]).numpy()
        fig.add_trace(go.Bar(x=x, y=y, name=f"{name}: best concept", marker_color=PALETTE[i % len(PALETTE)]))
    worst = torch.cat([gt.best_concept_per_value(f, None)[1] for f in factors]).numpy()
    fig.add_trace(go.Scatter(x=x, y=worst, mode="markers", name="one concept, its worst model",
                             marker=dict(symbol="line-ew-open", size=18, line=dict(width=3, color="black"))))
    fig.update_layout(barmode="group", title="Best per-token AUROC for each truth value",
                      yaxis=dict(title="AUROC", range=[0.5, 1.0]), height=420, margin=dict(l=60, r=20, t=60, b=110))
    return fig


def truth_scatter(stats: firing.FiringStats, gt: Any, title: str | None = None) -> go.Figure:
    """Each fired concept: firing entropy (x) vs how well ONE truth value explains it in its worst model (y,
    best AUROC of ``gt.best_value_per_concept(None)``); colour: co-fire proportion in its worst model."""
    best_f, best_v, best_a = gt.best_value_per_concept(None)
    ids = torch.nonzero(~stats.never_fired).reshape(-1)
    worst_cfp = stats.cofire_proportion.nan_to_num(0.0).min(0).values
    text = [f"{concept_text(stats, int(k))}<br>best truth (worst model): "
            f"{_value_label(gt, gt.factors[int(best_f[k])], int(best_v[k]))}, AUROC {float(best_a[k]):.2f}"
            for k in ids]
    fig = go.Figure(go.Scatter(x=stats.entropy[ids].numpy(), y=best_a[ids].numpy(), mode="markers", text=text,
                               hovertemplate="%{text}<extra></extra>",
                               marker=dict(size=6, color=worst_cfp[ids].numpy(), colorscale="Viridis", cmin=0,
                                           cmax=max(float(worst_cfp.max()), 0.05),
                                           colorbar=dict(title="CFP, worst model"))))
    fig.update_layout(title=title or "Paper metrics vs the truth: entropy against the best single truth value",
                      xaxis=dict(title="firing entropy", range=[-0.02, 1.02]),
                      yaxis=dict(title="best AUROC of one truth value, worst model"), height=440,
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


def bar_detection_figure(det: Any, paper_threshold: float = 0.5, title: str | None = None) -> go.Figure:
    """Precision and recall of the paper's universality bar (entropy > det.min_entropy, CFP > t in every model)
    as a detector of truly universal concepts, over the CFP threshold t (``usae.stats.groundtruth.BarDetection``);
    dashed lines: the paper's t and the t with the best F1 here."""
    t = det.thresholds.numpy()
    fig = go.Figure()
    for label, y, colour in (("precision", det.precision, PALETTE[0]), ("recall", det.recall, PALETTE[1]),
                             ("F1", det.f1, PALETTE[2])):
        fig.add_trace(go.Scatter(x=t, y=y.numpy(), mode="lines+markers", name=label, line=dict(color=colour)))
    for x, label in ((paper_threshold, "the paper's bar"), (det.best_threshold, "best F1 here")):
        fig.add_vline(x=x, line=dict(dash="dash", color="grey"), annotation_text=label,
                      annotation_position="top right" if x >= 0.3 else "top left")
    fig.update_layout(title=title or (f"The paper's bar as a detector of true universality ({det.n_true} truly "
                                      f"universal concepts: AUROC ≥ {det.auroc:g} for one value in every model)"),
                      xaxis=dict(title="co-fire proportion threshold t (entropy > "
                                       f"{det.min_entropy:g} and CFP > t in every model)", range=[0, 0.96]),
                      yaxis=dict(title="share", range=[0, 1.02]), height=420, margin=dict(l=60, r=20, t=70, b=60))
    return fig


def level_recovery_figure(rows: Sequence[Any], title: str | None = None) -> go.Figure:
    """Per factor (grouped by level): the share of its values detected by ONE concept in every model, and by
    some concept of each model alone (``usae.stats.groundtruth.FactorRecovery`` rows); the design (which models'
    tasks need the factor) is in each label."""
    x = [[r.level for r in rows], [f"{r.factor} ({r.expected})" for r in rows]]
    fig = go.Figure()
    names = rows[0].names if rows else ()
    for i, name in enumerate(names):
        fig.add_trace(go.Bar(x=x, y=[r.per_model[i] / r.values if r.values else 0 for r in rows],
                             name=f"{name}: some concept", marker_color=PALETTE[i % len(PALETTE)],
                             text=[("needs it" if name in r.needed_by else "") for r in rows],
                             textposition="inside"))
    fig.add_trace(go.Scatter(x=x, y=[r.universal_share for r in rows], mode="markers",
                             name="one concept, every model",
                             marker=dict(symbol="line-ew-open", size=22, line=dict(width=3, color="black"))))
    fig.update_layout(barmode="group", title=title or "Factor values detected at AUROC ≥ 0.9, by level",
                      yaxis=dict(title="share of the factor's values", range=[0, 1.05]), height=430,
                      margin=dict(l=60, r=20, t=60, b=80))
    return fig
