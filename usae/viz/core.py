"""Plotly figures for the book. Figures only draw what they are given; statistics are computed elsewhere.

``setup_notebook()`` makes plotly figures visible both in JupyterLab (interactive mime type) and in the
static book (an HTML div that uses the locally vendored ``plotly.min.js``; no CDN).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer
from plotly.subplots import make_subplots

BOOK_RENDERER = "usae_book_html"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


class _BookHtml(MimetypeRenderer):
    """A ``text/html`` div that draws with the page's own ``plotly.min.js``: no CDN, no MathJax script
    (the book's pages load both themselves), so figures render offline."""

    def to_mimebundle(self, fig_dict: dict) -> dict[str, str]:
        html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                           default_width="100%", default_height=525, validate=False)
        return {"text/html": html}


def setup_notebook() -> None:
    """Register the book's HTML renderer and make ``plotly_mimetype+usae_book_html`` the default."""
    if BOOK_RENDERER not in pio.renderers:
        pio.renderers[BOOK_RENDERER] = _BookHtml()
    pio.renderers.default = f"plotly_mimetype+{BOOK_RENDERER}"
    pio.templates.default = "plotly_white"


def _to_uint8(images) -> np.ndarray:
    """[N, 3, H, W] float in [0, 1] (tensor or array) -> [N, H, W, 3] uint8."""
    arr = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"images: expected shape [N, 3, H, W], got {list(arr.shape)}")
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def png_uri(image: np.ndarray) -> str:
    """[3, H, W] floats in [0, 1] -> a base64 PNG data URI (a few kB in a page, where plotly's pixel arrays take
    ten times more)."""
    from PIL import Image

    pix = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(pix).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_grid(images, titles: Sequence[str] | None = None, cols: int = 8, size: int = 110,
               title: str | None = None) -> go.Figure:
    """A grid of images. ``images``: [N, 3, H, W] floats in [0, 1]."""
    pix = _to_uint8(images)
    n = len(pix)
    rows = (n + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles) if titles else None,
                        horizontal_spacing=0.01, vertical_spacing=0.06 if titles else 0.01)
    for i, img in enumerate(pix):  # PNG sources, not pixel arrays: pages stay small
        fig.add_trace(go.Image(source=png_uri(img.transpose(2, 0, 1) / 255.0), hoverinfo="skip"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(width=cols * size + 40, height=rows * (size + (18 if titles else 0)) + 60,
                      margin=dict(l=10, r=10, t=50 if title else 30, b=10), title=title)
    if titles:
        fig.update_annotations(font_size=10)
    return fig


def label_maps(image, maps: Mapping[str, np.ndarray], names: Mapping[str, Sequence[str]],
               title: str | None = None) -> go.Figure:
    """One image beside its per-patch label maps. ``maps[f]``: [G, G] ints (-1 = absent); ``names[f]``: values."""
    pix = _to_uint8(image[None] if getattr(image, "ndim", 0) == 3 else image)[0]
    fig = make_subplots(rows=1, cols=1 + len(maps), subplot_titles=["image", *maps.keys()],
                        horizontal_spacing=0.03)
    fig.add_trace(go.Image(z=pix), row=1, col=1)
    for c, (factor, grid) in enumerate(maps.items(), start=2):
        grid = np.asarray(grid)
        text = [[names[factor][v] if v >= 0 else "·" for v in row] for row in grid]
        fig.add_trace(go.Heatmap(z=grid, text=text, texttemplate="%{text}", textfont=dict(size=8),
                                 colorscale="Turbo", showscale=False, zmin=-1,
                                 zmax=max(len(names[factor]) - 1, 0)), row=1, col=c)
        fig.update_yaxes(autorange="reversed", row=1, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(width=230 * (1 + len(maps)), height=290, margin=dict(l=10, r=10, t=60, b=10), title=title)
    return fig


def bars_with_chance(values: Mapping[str, float], chance: Mapping[str, float], title: str,
                     yaxis: str = "score") -> go.Figure:
    """Bars of a score per item with a marker at each item's chance level."""
    keys = list(values)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=keys, y=[values[k] for k in keys], name="held-out score", marker_color=PALETTE[0],
                         text=[f"{values[k]:.2f}" for k in keys], textposition="outside"))
    fig.add_trace(go.Scatter(x=keys, y=[chance[k] for k in keys], mode="markers", name="chance",
                             marker=dict(symbol="line-ew-open", size=30, line=dict(width=3, color="black"))))
    fig.update_layout(title=title, yaxis=dict(title=yaxis, range=[0, 1.1]), height=380,
                      margin=dict(l=50, r=20, t=60, b=80))
    return fig


def heatmaps(maps: Mapping[str, np.ndarray], title: str | None = None, colorscale: str = "Viridis",
             shared_scale: bool = True) -> go.Figure:
    """Side-by-side heatmaps (e.g. a channel before and after grid resampling); one colour scale if shared."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in maps.items()}
    lo = min(a.min() for a in arrays.values()) if shared_scale else None
    hi = max(a.max() for a in arrays.values()) if shared_scale else None
    fig = make_subplots(rows=1, cols=len(arrays), subplot_titles=list(arrays), horizontal_spacing=0.06)
    for c, a in enumerate(arrays.values(), start=1):
        fig.add_trace(go.Heatmap(z=a, colorscale=colorscale, zmin=lo, zmax=hi, showscale=c == len(arrays)),
                      row=1, col=c)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{c if c > 1 else ''}", row=1, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(width=320 * len(arrays) + 80, height=360, title=title, margin=dict(l=10, r=10, t=60, b=10))
    return fig


def histograms(samples: Mapping[str, np.ndarray], title: str, xaxis: str = "value", nbins: int = 60,
               log_y: bool = False) -> go.Figure:
    """Overlaid histograms of 1-D samples, one trace per key, binned here (``nbins`` shared bins over the finite
    values of all samples), so the page holds ``nbins`` counts per trace rather than every sample."""
    arrays = {name: np.asarray(values, dtype=np.float64).ravel() for name, values in samples.items()}
    finite = [a[np.isfinite(a)] for a in arrays.values()]
    finite = [a for a in finite if a.size]
    lo = min((float(a.min()) for a in finite), default=0.0)
    hi = max((float(a.max()) for a in finite), default=1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, nbins + 1)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = go.Figure()
    for i, (name, values) in enumerate(arrays.items()):
        counts, _ = np.histogram(values[np.isfinite(values)], bins=edges)
        fig.add_trace(go.Bar(x=centres, y=counts, width=widths, name=name, opacity=0.6,
                             marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(barmode="overlay", title=title, xaxis_title=xaxis, yaxis_title="count", height=380,
                      yaxis_type="log" if log_y else None, margin=dict(l=50, r=20, t=60, b=50))
    return fig


def table(rows: Sequence[Mapping[str, object]], title: str | None = None, height: int | None = None) -> go.Figure:
    """A plotly table from a list of dicts with the same keys (numbers shown with 4 significant digits)."""
    if not rows:
        raise ValueError("table: expected at least one row")
    keys = list(rows[0])

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[k]) for r in rows] for k in keys]
    fig = go.Figure(go.Table(header=dict(values=keys, fill_color="#dde6f0", align="left"),
                             cells=dict(values=cells, align="left")))
    if height is None:  # long texts wrap in narrow columns: count the lines (about 7 px per character)
        chars = max(8, int(620 / len(keys) / 7))
        lines = [max(1, -(-len(str(k)) // chars)) for k in keys]
        header = max(lines)
        body = sum(max(max(1, -(-len(col[i]) // chars)) for col in cells) for i in range(len(rows)))
        height = 50 + 18 * header + 10 + 22 * body + 8 * len(rows) + (40 if title else 0)
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40 if title else 10, b=10))
    return fig


# ---------------------------------------------------------------------------------------- training, R² figures
def lines(series: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, xaxis: str, yaxis: str,
          log_y: bool = False, height: int = 380) -> go.Figure:
    """One line per key: ``series[name] = (x, y)``."""
    fig = go.Figure()
    for i, (name, (x, y)) in enumerate(series.items()):
        fig.add_trace(go.Scatter(x=np.asarray(x), y=np.asarray(y), mode="lines", name=name,
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=height,
                      yaxis_type="log" if log_y else None, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def r2_heatmap(matrix, names: Sequence[str], title: str = "Cross-model R² (row: encoder, column: decoder)",
               zmin: float | None = None, zmax: float = 1.0) -> go.Figure:
    """The M x M R² matrix as an annotated heatmap (row i = encoder i, column j = decoder j)."""
    z = np.asarray(matrix, dtype=np.float64)
    fig = go.Figure(go.Heatmap(z=z, x=[f"decode → {n}" for n in names], y=[f"encode {n}" for n in names],
                               text=[[f"{v:.3f}" for v in row] for row in z], texttemplate="%{text}",
                               colorscale="Viridis", zmin=zmin if zmin is not None else min(0.0, z.min()), zmax=zmax))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, width=160 * len(names) + 260, height=130 * len(names) + 140,
                      margin=dict(l=140, r=20, t=60, b=60))
    return fig


def grouped_bars(values: Mapping[str, Mapping[str, float]], title: str, yaxis: str = "R²",
                 yrange: tuple[float, float] | None = None) -> go.Figure:
    """Grouped bars: ``values[series][group]`` (e.g. series = USAE / independent SAE, group = model)."""
    fig = go.Figure()
    for i, (series, by_group) in enumerate(values.items()):
        groups = list(by_group)
        fig.add_trace(go.Bar(x=groups, y=[by_group[g] for g in groups], name=series,
                             marker_color=PALETTE[i % len(PALETTE)],
                             text=[f"{by_group[g]:.3f}" for g in groups], textposition="outside"))
    fig.update_layout(barmode="group", title=title, yaxis=dict(title=yaxis, range=yrange), height=400,
                      margin=dict(l=60, r=20, t=60, b=60))
    return fig


def update_rule_diagram(names: Sequence[str], selected: int = 0, update: str = "paper") -> go.Figure:
    """The USAE training step as a diagram: model ``selected`` is encoded into the shared code Z, which is
    decoded into every model; boxes drawn bold are the parameters that take an optimiser step."""
    m = len(names)
    fig = go.Figure()
    ys = np.linspace(0.85, 0.15, m) if m > 1 else np.array([0.5])

    def box(x: float, y: float, text: str, stepped: bool, active: bool = True) -> None:
        colour = PALETTE[0] if stepped else ("#888888" if active else "#cccccc")
        fig.add_shape(type="rect", x0=x - 0.08, x1=x + 0.08, y0=y - 0.06, y1=y + 0.06,
                      line=dict(color=colour, width=4 if stepped else 1.5),
                      fillcolor="#e8f0fa" if stepped else "white")
        fig.add_annotation(x=x, y=y, text=text, showarrow=False, font=dict(size=12))

    def arrow(x0: float, y0: float, x1: float, y1: float, active: bool) -> None:
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                           arrowhead=3, arrowwidth=2 if active else 1, arrowcolor="#333" if active else "#ccc")

    for i, (name, y) in enumerate(zip(names, ys, strict=True)):
        box(0.08, y, f"A<sup>({name})</sup>", False, active=i == selected)
        box(0.30, y, f"Ψ<sup>({name})</sup>", stepped=i == selected, active=i == selected)
        box(0.72, y, f"D<sup>({name})</sup>", stepped=(i == selected) or update == "joint")
        box(0.93, y, f"Â<sup>({name})</sup>", False)
        arrow(0.16, y, 0.22, y, i == selected)
        arrow(0.80, y, 0.85, y, True)
    fig.add_shape(type="rect", x0=0.45, x1=0.57, y0=0.1, y1=0.9, line=dict(color="#555", width=2),
                  fillcolor="#f6f6f6")
    fig.add_annotation(x=0.51, y=0.5, text="shared<br>sparse<br>code Z<br>(TopK)", showarrow=False)
    arrow(0.38, ys[selected], 0.45, 0.5, True)
    for y in ys:
        arrow(0.57, 0.5, 0.64, y, True)
    stepped = "its encoder and decoder" if update == "paper" else "its encoder and every decoder"
    fig.update_layout(title=f"One training step: model '{names[selected]}' is picked; the loss sums all "
                            f"{m} reconstructions; {stepped} (bold) take a step",
                      xaxis=dict(visible=False, range=[0, 1.02]), yaxis=dict(visible=False, range=[0, 1]),
                      width=900, height=120 + 110 * m, margin=dict(l=10, r=10, t=60, b=10), showlegend=False)
    return fig


# ---------------------------------------------------------------------------------------------- seeds table
def seeds_headroom_figure(table, height_per_claim: int = 22) -> go.Figure:
    """Every bounded claim of a ``usae.claims.SeedsTable``: each seed's headroom over its bound, in the claim's
    direction and relative to the bound's scale (``(v - bound) / max(|bound|, |worst|)``, negated for ``<=``
    claims); 0 is the bound, left of it a failure. One dot per seed, one row per claim."""
    rows = [r for r in table.rows if r.op is not None]
    if not rows:
        raise ValueError("seeds_headroom_figure: the table has no bounded claim")
    fig = go.Figure()
    labels = [f"{r.chapter[:2]} · {r.name[:70]}" for r in rows]
    for j, seed in enumerate(table.seeds):
        xs = []
        for r in rows:
            v = r.values[j]
            scale = max(abs(r.bound), abs(r.worst), 1e-9)
            sign = 1.0 if r.op in (">=", ">") else -1.0
            xs.append(sign * (v - r.bound) / scale)
        fig.add_trace(go.Scatter(x=xs, y=labels, mode="markers", name=f"seed {seed}",
                                 marker=dict(size=8, color=PALETTE[j % len(PALETTE)], opacity=0.8)))
    fig.add_vline(x=0, line_dash="dash", line_color="#c0392b")
    fig.update_layout(title="Headroom of every claim over its bound, per seed (0 = the bound; relative scale)",
                      xaxis_title="(value - bound) / scale, in the claim's direction", height=120 +
                      height_per_claim * len(rows), margin=dict(l=10, r=10, t=50, b=40),
                      yaxis=dict(autorange="reversed"))
    return fig
