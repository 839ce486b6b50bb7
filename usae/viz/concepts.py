"""Concept figures (paper Fig. 4, 6, 7, 9-16) and concept explorers. Figures draw; statistics come from
``usae.stats.firing``, ``usae.stats.consistency`` and ``usae.stats.galleries`` (the figures that judge concepts
against the toy world's truth are in ``usae.viz.groundtruth``).

Galleries draw each model's heatmap over the same images with ONE colour scale shared by all models (and,
when given, by several galleries), so that a weaker concept in one model looks weaker. The official code
normalises each image separately, which hides exactly those differences.

Everything is plotly and works in the static book: :func:`concept_explorer` switches concepts with a dropdown
(plotly ``updatemenus``, no kernel). :func:`explorer_widget` is the JupyterLab version (ipywidgets; it
computes galleries on demand, so it needs a running kernel and shows nothing in static HTML).
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import sequential
from plotly.subplots import make_subplots

from usae.stats import firing, universality
from usae.viz.core import PALETTE, png_uri

__all__ = ["entropy_histogram_figure", "cofire_proportion_figure", "energy_cofire_figure", "split_comparison_figure",
           "gallery_figure", "concept_explorer", "explorer_widget", "matched_cosine_figure", "concept_scatter",
           "concept_text", "concept_title", "OVERLAY_COLORSCALE"]

# viridis with an alpha ramp: 0 is transparent, strong activations opaque ("bright = stronger")
OVERLAY_COLORSCALE = [[i / (len(sequential.Viridis) - 1),
                       "rgba({},{},{},{:.2f})".format(*(int(c[j:j + 2], 16) for j in (1, 3, 5)),
                                                      0.9 * i / (len(sequential.Viridis) - 1))]
                      for i, c in enumerate(sequential.Viridis)]


# ------------------------------------------------------------------------------------------ Fig. 6 and 13
def entropy_histogram_figure(stats: firing.FiringStats | Mapping[str, firing.FiringStats], n_bins: int = 30,
                             title: str | None = None) -> go.Figure:
    """Fig. 6a: firing-entropy histogram (``n_bins`` bars over [0, 1]); never-fired concepts reported apart.

    Several ``{label: stats}`` are overlaid as fractions of their fired concepts (Fig. 13).
    """
    many = isinstance(stats, Mapping)
    items = dict(stats) if many else {"concepts": stats}
    fig, never = go.Figure(), []
    for i, (label, st) in enumerate(items.items()):
        counts, edges, n_never = universality.entropy_histogram(st, n_bins)
        y = counts.double() / max(int(counts.sum()), 1) if many else counts
        centres = ((edges[:-1] + edges[1:]) / 2).numpy()
        fig.add_trace(go.Bar(x=centres, y=y.numpy(), width=1.0 / n_bins, name=label, opacity=0.6 if many else 1.0,
                             marker_color=PALETTE[i % len(PALETTE)]))
        never.append(f"{label}: {n_never}" if many else str(n_never))
    m = next(iter(items.values())).n_models
    for j in range(2, m + 1):                      # uniform firing over exactly j of the M models
        fig.add_vline(x=math.log(j) / math.log(m), line_dash="dot", line_color="#888",
                      annotation_text=f"{j} models", annotation_position="top")
    fig.update_layout(title=title or f"Firing entropy ({n_bins} bins; never-fired concepts, not shown: "
                                     f"{', '.join(never)})", barmode="overlay", bargap=0,
                      xaxis=dict(title="firing entropy (normalised by log M)", range=[0, 1]),
                      yaxis_title="fraction of fired concepts" if many else "concepts", height=380,
                      margin=dict(l=60, r=20, t=70, b=50))
    return fig


def cofire_proportion_figure(stats: firing.FiringStats, top: int = 1000, variant: str = "eq9",
                             title: str | None = None) -> go.Figure:
    """Fig. 6b: each model's co-fire proportion over the ``top`` concepts by energy, sorted; means in the legend."""
    curves, means = universality.cfp_curves(stats, top, variant)
    mean_curve = universality.cfp_mean_curve(stats, top, variant)
    fig = go.Figure()
    rank = np.arange(1, curves.shape[1] + 1)
    for i, name in enumerate(stats.names):
        fig.add_trace(go.Scatter(x=rank, y=curves[i].numpy(), mode="lines", line=dict(color=PALETTE[i % 8]),
                                 name=f"{name} (mean {float(means[i]):.3f})"))
    fig.add_trace(go.Scatter(x=rank, y=mean_curve.numpy(), mode="lines", line=dict(color="black", dash="dash"),
                             name=f"mean over models (mean {float(mean_curve.mean()):.3f})"))
    fig.update_layout(title=title or f"Co-fire proportion of the top {curves.shape[1]} concepts by energy, sorted",
                      xaxis_title="concept rank (sorted by co-fire proportion)", yaxis=dict(title="co-fire proportion",
                      range=[0, 1.02]), height=380, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def energy_cofire_figure(stats: firing.FiringStats, min_cofires: int = 1000, variant: str = "code",
                         reduce: str = "mean") -> go.Figure:
    """Fig. 6c: log-log co-fire count vs energy with the fitted line and Pearson r, for all concepts and for
    those with >= ``min_cofires`` co-fires. ``variant``/``reduce`` name the energy (see ``firing``)."""
    fits = [universality.energy_cofire_fit(stats, 1, variant, reduce),
            universality.energy_cofire_fit(stats, min_cofires, variant, reduce)]
    titles = [f"{label}: r = {f.pearson_r:.2f}, slope = {f.slope:.2f} (n = {f.n_concepts})"
              for label, f in zip(("all co-firing concepts", f"≥ {min_cofires} co-fires"), fits, strict=True)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.1)
    energy = stats.aggregated_energy_of(variant, reduce)
    for c, (lo, fit) in enumerate(zip((1, min_cofires), fits, strict=True), start=1):
        keep = (stats.cofires >= max(lo, 1)) & (energy > 0)
        x, y = stats.cofires[keep].double().numpy(), energy[keep].numpy()
        ids = torch.nonzero(keep).reshape(-1).numpy()
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", marker=dict(size=4, color=PALETTE[0], opacity=0.5),
                                 text=[f"concept {i}" for i in ids], showlegend=False,
                                 hovertemplate="%{text}<br>co-fires %{x}<br>energy %{y:.3g}<extra></extra>"),
                      row=1, col=c)
        if np.isfinite(fit.slope) and len(x):
            lx = np.linspace(np.log10(x.min()), np.log10(x.max()), 20)
            fig.add_trace(go.Scatter(x=10 ** lx, y=10 ** (fit.slope * lx + fit.intercept), mode="lines",
                                     line=dict(color=PALETTE[3]), showlegend=False, hoverinfo="skip"), row=1, col=c)
    fig.update_xaxes(type="log", title="co-fire count |C_k|")
    what = {"code": "‖E[Z_k] D_k‖ (official code)", "eq9": "‖E[Z_k] D_k‖² (Eq. 9)"}[variant]
    fig.update_yaxes(type="log", title=f"energy {what}, {reduce} over models", col=1)
    fig.update_yaxes(type="log", col=2)
    fig.update_layout(height=440, margin=dict(l=70, r=20, t=90, b=50),
                      title="Universality vs importance (log-log; least-squares fit of the logs)")
    return fig


def split_comparison_figure(stats: Mapping[str, firing.FiringStats], top: int = 1000, n_bins: int = 30) -> go.Figure:
    """Fig. 13: firing-entropy distribution and mean co-fire-proportion curve, one trace per split."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "firing entropy (fraction of fired concepts)", f"mean co-fire proportion, top {top} concepts by energy"))
    for i, (label, st) in enumerate(stats.items()):
        counts, edges, _ = universality.entropy_histogram(st, n_bins)
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=((edges[:-1] + edges[1:]) / 2).numpy(), line=dict(color=colour, shape="hvh"),
                                 y=(counts.double() / max(int(counts.sum()), 1)).numpy(), name=label,
                                 legendgroup=label, showlegend=False), row=1, col=1)
        curve = universality.cfp_mean_curve(st, top)
        fig.add_trace(go.Scatter(x=np.arange(1, len(curve) + 1), y=curve.numpy(), line=dict(color=colour),
                                 name=f"{label} (mean {float(curve.mean()):.3f})", legendgroup=label), row=1, col=2)
    fig.update_xaxes(title="firing entropy", range=[0, 1], row=1, col=1)
    fig.update_xaxes(title="concept rank", row=1, col=2)
    fig.update_layout(height=400, margin=dict(l=60, r=20, t=60, b=50), title="In distribution vs held-out splits")
    return fig


# ------------------------------------------------------------------------------------------------ galleries
def _upsample(maps: torch.Tensor, size: int) -> np.ndarray:
    """[n, G, G] -> [n, size, size] bilinear (no overshoot), float32."""
    m = torch.as_tensor(maps, dtype=torch.float32)[:, None]
    return torch.nn.functional.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def _gallery_traces(images: Any, heatmaps: Mapping[str, Any], zmax: float, overlay_size: int,
                    visible: bool = True, colorbar: dict | None = None) -> list[tuple[int, int, Any]]:
    """(row, col, trace) for a gallery: one row per model, the same images in every row."""
    imgs = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, dtype=np.float32)
    if imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images: expected shape [n, 3, H, W], got {list(imgs.shape)}")
    n, side = imgs.shape[0], imgs.shape[-1]
    uris = [png_uri(im) for im in imgs]
    step = side / overlay_size
    out = []
    for r, (name, maps) in enumerate(heatmaps.items(), start=1):
        maps = torch.as_tensor(maps)
        if maps.dim() != 3 or maps.shape[0] != n:
            raise ValueError(f"heatmaps[{name!r}] has shape {list(maps.shape)}; expected [{n}, G, G]")
        up = _upsample(maps, overlay_size)
        for c in range(n):
            out.append((r, c + 1, go.Image(source=uris[c], visible=visible, hoverinfo="skip")))
            out.append((r, c + 1, go.Heatmap(
                z=up[c], x0=step / 2 - 0.5, dx=step, y0=step / 2 - 0.5, dy=step, zmin=0.0, zmax=zmax,
                zsmooth="best", colorscale=OVERLAY_COLORSCALE, visible=visible, name=name,
                showscale=r == 1 and c == n - 1, colorbar=colorbar or dict(title="Z", len=0.8),
                hovertemplate=f"{name}<br>activation %{{z:.3f}}<extra></extra>")))
    return out


def _style_cells(fig: go.Figure, side: int) -> None:
    fig.update_xaxes(visible=False, range=[-0.5, side - 0.5])
    fig.update_yaxes(visible=False, range=[side - 0.5, -0.5], scaleratio=1)


def gallery_figure(images: Any, heatmaps: Mapping[str, Any], title: str | None = None,
                   captions: Sequence[str] | None = None, zmax: float | None = None, overlay_size: int = 16,
                   cell: int = 120) -> go.Figure:
    """Fig. 4-style gallery: ``images`` [n, 3, H, W] in columns, one row per model of ``heatmaps``
    ({model: [n, G, G]} code values), upsampled and overlaid with ONE colour scale [0, zmax] shared by every
    model (``zmax`` defaults to the largest value shown; pass it to share a scale between galleries)."""
    hi = max(float(torch.as_tensor(m).max()) for m in heatmaps.values()) if zmax is None else float(zmax)
    hi = hi if hi > 0 else 1.0
    n, rows = len(images), len(heatmaps)
    fig = make_subplots(rows=rows, cols=n, row_titles=list(heatmaps), horizontal_spacing=0.005,
                        vertical_spacing=0.01, column_titles=list(captions) if captions else None)
    for r, c, trace in _gallery_traces(images, heatmaps, hi, overlay_size):
        fig.add_trace(trace, row=r, col=c)
    _style_cells(fig, int(np.asarray(images).shape[-1]))
    fig.update_annotations(font_size=10)
    fig.update_layout(title=dict(text=title, font_size=13), width=n * cell + 140, height=rows * cell + 100,
                      margin=dict(l=10, r=60, t=80 if title else 30, b=10))
    return fig


def _concept_index(stats: firing.FiringStats, concept: int) -> int:
    """``concept`` as an int (a Python, numpy or 0-d torch integer), ValueError unless in [0, m)."""
    try:
        k = None if isinstance(concept, bool) else operator.index(concept)
    except TypeError:
        k = None
    if k is None or not 0 <= k < stats.n_latents:
        raise ValueError(f"concept = {concept!r} is not valid; expected a concept index in [0, {stats.n_latents}) "
                         f"(the USAE has m = {stats.n_latents} concepts)")
    return k


def concept_text(stats: firing.FiringStats, concept: int) -> str:
    """One-line HTML summary of a concept's firing statistics (for hovers and titles)."""
    k = _concept_index(stats, concept)
    cfp = stats.cofire_proportion[:, k].nan_to_num(0.0)
    fires = ", ".join(f"{n} {int(stats.fires[i, k])}" for i, n in enumerate(stats.names))
    cfps = ", ".join(f"{n} {float(cfp[i]):.2f}" for i, n in enumerate(stats.names))
    return (f"concept {k}<br>energy {float(stats.aggregated_energy[k]):.3g}; entropy "
            f"{float(stats.entropy[k]) + 0.0:.2f}; co-fires {int(stats.cofires[k])}<br>fires: {fires}<br>CFP: {cfps}")


def concept_title(stats: firing.FiringStats, concept: int) -> str:
    """A short two-line title: entropy, and per model (in ``stats.names`` order) fires and CFP."""
    k = _concept_index(stats, concept)
    cfp = stats.cofire_proportion[:, k].nan_to_num(0.0)
    return (f"concept {k} · entropy {float(stats.entropy[k]) + 0.0:.2f}<br>fires "
            f"{' / '.join(str(int(f)) for f in stats.fires[:, k])} · CFP "
            f"{' / '.join(f'{float(c):.2f}' for c in cfp)} ({' / '.join(stats.names)})")


def concept_scatter(stats: firing.FiringStats, highlight: Mapping[str, Sequence[int]] | None = None,
                    title: str = "Concepts: firing entropy vs energy (colour: mean co-fire proportion)") -> go.Figure:
    """Every fired concept as a point (x entropy, y aggregated energy, log), hover = its statistics."""
    fig = go.Figure()
    for trace in _scatter_traces(stats, highlight):
        fig.add_trace(trace)
    fig.update_layout(title=title, xaxis_title="firing entropy", yaxis=dict(title="energy (sum over models)",
                      type="log"), height=420, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def _scatter_traces(stats: firing.FiringStats, highlight: Mapping[str, Sequence[int]] | None) -> list[Any]:
    ids = torch.nonzero(~stats.never_fired & (stats.aggregated_energy > 0)).reshape(-1)
    mean_cfp = stats.cofire_proportion.nan_to_num(0.0).mean(0)
    traces = [go.Scatter(x=stats.entropy[ids].numpy(), y=stats.aggregated_energy[ids].numpy(), mode="markers",
                         name="concepts", text=[concept_text(stats, int(k)) for k in ids],
                         hovertemplate="%{text}<extra></extra>",
                         marker=dict(size=5, color=mean_cfp[ids].numpy(), colorscale="Viridis", cmin=0, cmax=1,
                                     colorbar=dict(title="mean CFP", x=1.04, len=0.35, y=1.0, yanchor="top")))]
    for i, (label, chosen) in enumerate((highlight or {}).items()):
        c = torch.as_tensor(list(chosen), dtype=torch.int64)
        traces.append(go.Scatter(x=stats.entropy[c].numpy(), y=stats.aggregated_energy[c].numpy(), mode="markers",
                                 name=label, hoverinfo="skip", marker=dict(size=11, symbol="circle-open",
                                 line=dict(width=2), color=PALETTE[(i + 1) % len(PALETTE)])))
    return traces


def concept_explorer(stats: firing.FiringStats, galleries: Mapping[int, Any],
                     labels: Mapping[int, str] | None = None, overlay_size: int | None = None,
                     cell: int = 110) -> go.Figure:
    """A static-HTML explorer: the concept scatter on top, and below it the per-model heatmaps of one concept's
    top images; a dropdown (one entry per concept of ``galleries``: {concept: ``usae.stats.galleries.Gallery`` or
    (images [n,3,H,W], {model: [n, G, G]})}) switches the concept. Each gallery has one colour scale shared by
    its models. ``overlay_size`` None keeps the G x G heatmaps (the browser smooths them; a smaller page)."""
    if not galleries:
        raise ValueError("galleries is empty; expected {concept: (images, heatmaps)} for one or more concepts")
    galleries = {int(k): (g.images, g.heatmaps) if hasattr(g, "heatmaps") else tuple(g) for k, g in galleries.items()}
    concepts = list(galleries)
    n = max(len(g[0]) for g in galleries.values())
    rows = len(next(iter(galleries.values()))[1])
    specs = [[{"colspan": n}] + [None] * (n - 1), [None] * n] + [[{}] * n for _ in range(rows)]
    fig = make_subplots(rows=rows + 2, cols=n, specs=specs, row_heights=[1.6, 0.3] + [1.0] * rows,
                        vertical_spacing=0.01, horizontal_spacing=0.005)
    for trace in _scatter_traces(stats, None):
        fig.add_trace(trace, row=1, col=1)
    n_fixed, groups = len(fig.data), []
    for j, k in enumerate(concepts):
        images, maps = galleries[k]
        hi = max(float(torch.as_tensor(m).max()) for m in maps.values()) or 1.0
        start = len(fig.data)
        fig.add_trace(go.Scatter(x=[float(stats.entropy[k])], y=[float(stats.aggregated_energy[k])], mode="markers",
                                 marker=dict(size=16, symbol="circle-open", line=dict(width=3), color="red"),
                                 name=f"concept {k}", visible=j == 0, hoverinfo="skip"), row=1, col=1)
        bar = dict(title="Z", len=rows / (rows + 1.9) * 0.95, y=0, yanchor="bottom", x=1.04)
        size = overlay_size or int(torch.as_tensor(next(iter(maps.values()))).shape[-1])
        for r, c, trace in _gallery_traces(images, maps, hi, size, visible=j == 0, colorbar=bar):
            fig.add_trace(trace, row=r + 2, col=c)
        groups.append(range(start, len(fig.data)))
    side = int(np.asarray(next(iter(galleries.values()))[0]).shape[-1])
    _style_cells(fig, side)
    for r, name in enumerate(next(iter(galleries.values()))[1], start=3):   # model names right of each row
        dom = fig.get_subplot(r, n).yaxis.domain
        fig.add_annotation(text=name, textangle=90, showarrow=False, xref="paper", yref="paper", x=1.0,
                           xanchor="left", y=(dom[0] + dom[1]) / 2, font=dict(size=12))
    fig.update_xaxes(visible=True, title="firing entropy", range=None, row=1, col=1)
    fig.update_yaxes(visible=True, type="log", title="energy", range=None, autorange=True, row=1, col=1)
    titles = {k: (labels or {}).get(k, f"concept {k}") for k in concepts}
    buttons = []
    for j, k in enumerate(concepts):
        visible = [True] * n_fixed + [False] * (len(fig.data) - n_fixed)
        for t in groups[j]:
            visible[t] = True
        buttons.append(dict(label=titles[k], method="update", args=[{"visible": visible}]))
    fig.update_layout(updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.02,
                                        yanchor="bottom", showactive=True)],
                      title=dict(text="Concept explorer (choose a concept on the right)", x=0.02, xanchor="left"),
                      width=max(n * cell + 200, 760), height=int(1.9 * cell * 1.4) + rows * cell + 160,
                      margin=dict(l=60, r=90, t=90, b=10), showlegend=False)
    return fig


def explorer_widget(model: Any, acts: Any, world: Any, stats: firing.FiringStats, concepts: Sequence[int],
                    split: str = "val", n_images: int = 6) -> Any:
    """JupyterLab explorer (ipywidgets): pick a concept and a pooling; the gallery is computed on demand.

    Needs a live kernel (widgets render nothing in a static page; the book shows :func:`concept_explorer`).
    """
    import ipywidgets as widgets

    from usae.stats import galleries as gal

    if not len(concepts):
        raise ValueError("concepts is empty; expected one or more concept ids")
    pick = widgets.Dropdown(options=[(f"concept {int(k)}", int(k)) for k in concepts], description="concept")
    pool = widgets.ToggleButtons(options=list(gal.POOLINGS), description="rank by")
    out = widgets.Output()

    def show(*_: Any) -> None:
        g = gal.galleries(model, acts, world, [pick.value], split, n_images, pool.value)[pick.value]
        fig = gallery_figure(g.images, g.heatmaps, captions=g.captions,
                             title=concept_title(stats, pick.value))
        # set the Output's state directly: capturing a plotly display with ``with out:`` hangs under nbclient
        out.outputs = ({"output_type": "display_data", "metadata": {},
                        "data": {"application/vnd.plotly.v1+json": json.loads(fig.to_json()),
                                 "text/plain": f"gallery of concept {pick.value}"}},)

    pick.observe(show, names="value")
    pool.observe(show, names="value")
    show()
    return widgets.VBox([widgets.HBox([pick, pool]), out])


# ------------------------------------------------------------------------------------- Fig. 7/16, truth
def matched_cosine_figure(reports: Mapping[str, Any], which: str = "matching",
                          subsets: Mapping[str, Any] | None = None, title: str | None = None) -> go.Figure:
    """Fig. 7: per model, the Hungarian-matched cosine distribution (left) and the fraction of concepts above
    each threshold (right; legend: AUC, fraction > 0.5), with each model's random-Normal baseline dotted.

    ``which``: the report's ``"matching"`` or ``"subset"``; ``subsets`` ({model: concept ids}) instead keeps
    those USAE concepts' pairs of the full matching."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "matched cosine similarity", "fraction of concepts with cosine > threshold"))
    for i, (name, rep) in enumerate(reports.items()):
        chosen = rep.matching.subset(subsets[name]) if subsets is not None else getattr(rep, which)
        for mt, dash in ((chosen, "solid"), (rep.baseline, "dot")):
            if mt is None:
                continue
            label = f"{name}{' random baseline' if dash == 'dot' else ''}"
            colour = PALETTE[i % len(PALETTE)]
            fig.add_trace(go.Histogram(x=mt.similarity.numpy(), xbins=dict(start=-0.2, end=1.0, size=0.025),
                                       histnorm="probability", name=label, legendgroup=label, showlegend=False,
                                       marker_color=colour, opacity=0.35 if dash == "dot" else 0.6),
                          row=1, col=1)
            t, frac = mt.curve()
            fig.add_trace(go.Scatter(x=t.numpy(), y=frac.numpy(), mode="lines", legendgroup=label,
                                     line=dict(color=colour, dash=dash),
                                     name=f"{label}: AUC {mt.auc:.2f}, >0.5: {mt.fraction_above(0.5):.0%}"),
                          row=1, col=2)
    fig.add_vline(x=0.5, line_dash="dot", line_color="#888", row=1, col=2)
    fig.update_layout(barmode="overlay", height=420, margin=dict(l=60, r=20, t=60, b=50),
                      title=title or "USAE atoms vs independent-SAE atoms (Hungarian matching)")
    fig.update_xaxes(title="cosine", row=1, col=1)
    fig.update_xaxes(title="threshold", range=[0, 1], row=1, col=2)
    return fig
