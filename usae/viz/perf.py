"""Figures of the performance chapter: FLOPs and measured time per part of a training step, the ideas of
the fast step as small diagrams, the benchmark table and the scaling curves.

Every function draws the rows it is given (from ``usae.perf.step``); nothing here trains or times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from usae.viz.core import PALETTE, table

IMPL_COLOURS = {"reference": PALETTE[3], "ours": PALETTE[0]}
# one colour and one stacking position per part, the same in every figure
PART_COLOURS = {"dense GEMM, forward": PALETTE[3], "dense GEMM, backward": "#f4a6a6", "TopK / sort": PALETTE[1],
                "gather, scatter, sparse": PALETTE[0], "elementwise, reductions, copies": PALETTE[2],
                "optimizer (clip + AdamW)": PALETTE[4], "other (Python, autograd)": "#bbbbbb"}
_GREY, _LIGHT = "#888888", "#eeeeee"


def flop_bars(rows: Sequence[Mapping[str, Any]], title: str = "FLOPs per part of one step") -> go.Figure:
    """Horizontal bars (log scale) of ``rows[i]["reference"]`` and ``["ours"]`` per ``["part"]`` (no total)."""
    parts = [r for r in rows if r["part"] != "total"]
    if not parts:
        raise ValueError("flop_bars: expected at least one part")
    fig = go.Figure()
    for impl in ("reference", "ours"):
        fig.add_trace(go.Bar(y=[r["part"] for r in parts], x=[max(float(r[impl]), 1.0) / 1e9 for r in parts],
                             name="official reference" if impl == "reference" else "ours", orientation="h",
                             marker_color=IMPL_COLOURS[impl]))
    fig.update_layout(barmode="group", title=title, xaxis=dict(title="GFLOP (log scale)", type="log"),
                      yaxis=dict(autorange="reversed"), height=90 + 42 * len(parts),
                      margin=dict(l=230, r=20, t=60, b=50))
    return fig


def flop_table(rows: Sequence[Mapping[str, Any]], title: str = "FLOPs per part of one step") -> go.Figure:
    """The FLOP rows as a table in GFLOP with the formulas and the reference / ours ratio."""
    out = []
    for r in rows:
        ref, ours = float(r["reference"]), float(r["ours"])
        out.append({"part": r["part"], "reference GFLOP": round(ref / 1e9, 3),
                    "reference formula": r["reference formula"], "ours GFLOP": round(ours / 1e9, 3),
                    "ours formula": r["ours formula"],
                    "ratio": f"{ref / ours:.1f}x" if ours > 0 else "-"})
    return table(out, title=title)


def parts_bars(rows: Sequence[Mapping[str, Any]], title: str = "Measured time per part of one step") -> go.Figure:
    """One stacked horizontal bar per implementation from rows {impl, part, seconds} ("whole step" rows, the
    step timed without the profiler, are shown as a marker)."""
    impls = [i for i in ("reference", "ours") if any(r["impl"] == i for r in rows)]
    seen = list(dict.fromkeys(r["part"] for r in rows if r["part"] != "whole step"))
    parts = [p for p in PART_COLOURS if p in seen] + [p for p in seen if p not in PART_COLOURS]
    if not impls or not parts:
        raise ValueError("parts_bars: expected rows {impl, part, seconds} for 'reference' and/or 'ours'")
    seconds = {(r["impl"], r["part"]): float(r["seconds"]) for r in rows}
    labels = {"reference": "official reference", "ours": "ours"}
    fig = go.Figure()
    for c, part in enumerate(parts):
        fig.add_trace(go.Bar(y=[labels[i] for i in impls], x=[seconds.get((i, part), 0.0) for i in impls], name=part,
                             orientation="h", marker_color=PART_COLOURS.get(part, PALETTE[c % len(PALETTE)]),
                             hovertemplate=f"{part}: %{{x:.3g}} s<extra></extra>"))
    whole = [(labels[i], seconds[(i, "whole step")]) for i in impls if (i, "whole step") in seconds]
    if whole:
        fig.add_trace(go.Scatter(y=[w[0] for w in whole], x=[w[1] for w in whole], mode="markers+text",
                                 name="whole step (without profiler)", text=[f"{w[1]:.3g} s" for w in whole],
                                 textposition="middle right",
                                 marker=dict(symbol="line-ns-open", size=28, color="black",
                                             line=dict(width=3, color="black"))))
    fig.update_layout(barmode="stack", title=title, xaxis_title="seconds", height=300,
                      margin=dict(l=140, r=60, t=60, b=50),
                      legend=dict(orientation="h", y=-0.3, traceorder="normal"))
    return fig


def _axes(fig: go.Figure, title: str, height: int, width: int = 900) -> go.Figure:
    fig.update_layout(title=title, xaxis=dict(visible=False, range=[0, 1]), yaxis=dict(visible=False, range=[0, 1]),
                      width=width, height=height, margin=dict(l=10, r=10, t=60, b=10), showlegend=False,
                      plot_bgcolor="white")
    return fig


def _box(fig: go.Figure, x0: float, y0: float, x1: float, y1: float, text: str = "", colour: str = _GREY,
         fill: str = "white", width: float = 1.5, size: int = 12) -> None:
    fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, line=dict(color=colour, width=width), fillcolor=fill)
    if text:
        fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=text, showarrow=False, font=dict(size=size))


def _arrow(fig: go.Figure, x0: float, y0: float, x1: float, y1: float, colour: str = "#333", text: str = "") -> None:
    fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                       arrowhead=3, arrowwidth=1.5, arrowcolor=colour, text=text)


def shared_gather_diagram(names: Sequence[str], k: int = 32, rows: Sequence[int] = (1, 4, 6)) -> go.Figure:
    """One gather serves every decoder: a token's k indices pick the same rows of every dictionary D⁽ʲ⁾, and
    x̂⁽ʲ⁾ = Σ values · those rows. The dense route multiplies the whole [B, m] code with every D⁽ʲ⁾."""
    if not names:
        raise ValueError("shared_gather_diagram: expected at least one model name")
    fig = go.Figure()
    n_rows, top, bottom = 8, 0.86, 0.26
    step = (top - bottom) / n_rows
    _box(fig, 0.02, 0.38, 0.16, 0.74, "code of token n<br>(values, indices)<br>" + f"k = {k} pairs,<br>read once",
         colour=PALETTE[0], fill="#e8f0fa", width=2)
    xs = [0.26 + 0.5 * j / max(len(names), 1) for j in range(len(names))]
    w = min(0.12, 0.4 / max(len(names), 1))
    for j, (name, x) in enumerate(zip(names, xs, strict=True)):
        for r in range(n_rows):
            y0 = top - (r + 1) * step
            chosen = r in rows
            fill = PALETTE[j % len(PALETTE)] if chosen else "white"
            _box(fig, x, y0, x + w, y0 + step, colour="#bbbbbb", fill=fill, width=1)
        fig.add_annotation(x=x + w / 2, y=top + 0.05, text=f"D<sup>({name})</sup>  [m, d]", showarrow=False)
        _arrow(fig, x + w / 2, bottom - 0.005, x + w / 2, bottom - 0.07)
        fig.add_annotation(x=x + w / 2, y=bottom - 0.1, text=f"x̂<sup>({name})</sup> = Σ value · row",
                           showarrow=False, font=dict(size=11))
    for r in rows:
        y = top - (r + 0.5) * step
        fig.add_shape(type="line", x0=0.16, x1=xs[-1] + w, y0=y, y1=y,
                      line=dict(color=PALETTE[0], width=1.5, dash="dot"))
    fig.add_annotation(x=0.5, y=0.02, showarrow=False, font=dict(size=12),
                       text="the same k rows of every dictionary are gathered in one pass; the dense route "
                            "multiplies the whole [B, m] code (m − k zeros per row) with each D")
    return _axes(fig, f"One gather serves all {len(names)} decoders", 380)


def grouped_pairs_diagram(pairs: Mapping[str, Sequence[int]] | None = None, n_decoders: int = 3) -> go.Figure:
    """(token, latent) pairs grouped by latent once per step: the transpose of the code's sparsity pattern,
    reused by the dictionary gradient of every decoder (∇D⁽ʲ⁾[l] = Σ over the tokens using l of value · g⁽ʲ⁾)."""
    pairs = pairs or {"t0": (5, 2), "t1": (2, 7), "t2": (5, 9), "t3": (7, 2)}
    buckets: dict[int, list[str]] = {}
    for token, latents in pairs.items():
        for latent in latents:
            buckets.setdefault(latent, []).append(token)
    fig = go.Figure()
    n = len(pairs)
    for r, (token, latents) in enumerate(pairs.items()):
        y = 0.8 - r * 0.6 / max(n - 1, 1)
        _box(fig, 0.03, y - 0.05, 0.23, y + 0.05, f"{token}: latents {', '.join(map(str, latents))}")
    fig.add_annotation(x=0.13, y=0.95, text="code, by token ([B, k])", showarrow=False)
    _arrow(fig, 0.25, 0.5, 0.36, 0.5, text="")
    fig.add_annotation(x=0.305, y=0.58, text="sort by latent<br><b>once per step</b>", showarrow=False,
                       font=dict(size=11))
    nb = len(buckets)
    for r, (latent, tokens) in enumerate(sorted(buckets.items())):
        y = 0.8 - r * 0.6 / max(nb - 1, 1)
        _box(fig, 0.38, y - 0.05, 0.6, y + 0.05, f"latent {latent}: {', '.join(tokens)}", colour=PALETTE[0],
             fill="#e8f0fa")
    fig.add_annotation(x=0.49, y=0.95, text="the same pairs, by latent (CSR of Zᵀ)", showarrow=False)
    for j in range(n_decoders):
        y = 0.75 - j * 0.5 / max(n_decoders - 1, 1)
        _arrow(fig, 0.61, 0.5, 0.70, y)
        _box(fig, 0.71, y - 0.06, 0.98, y + 0.06,
             f"∇D<sup>({j + 1})</sup>[l] = Σ<sub>tokens of l</sub> value · g<sup>({j + 1})</sup>",
             colour=PALETTE[(j + 1) % len(PALETTE)])
    fig.add_annotation(x=0.5, y=0.04, showarrow=False, text="the index work depends only on the code, so every "
                       "decoder's backward reuses it")
    return _axes(fig, "(token, latent) pairs grouped by latent once, used by every decoder", 360)


def gram_backward_diagram(batch_size: int, dim: int, n_latents: int, nnz: int) -> go.Figure:
    """The encoder's weight gradient through BatchNorm: dense Gᵀ X against the Gram-matrix form, whose
    only B-sized work is a sparse product (nnz nonzeros per token) and the Gram matrix XᵀX [d, d]."""
    B, d, m = batch_size, dim, n_latents
    dense = 2 * B * m * d
    sparse, gram, proj = 2 * B * nnz * d, 2 * B * d * d, 2 * m * d * d
    fig = go.Figure()
    fig.add_annotation(x=0.02, y=0.93, xanchor="left", showarrow=False, font=dict(size=13),
                       text=f"<b>dense</b>: ∇W = Gᵀ X with G = ∂L/∂(X Wᵀ) a dense [B, m] matrix "
                            f"(BatchNorm spreads the gradient)  →  2·B·m·d = {dense / 1e9:.3g} GFLOP")
    _box(fig, 0.04, 0.62, 0.30, 0.86, f"Gᵀ<br>[{m} × {B}]", fill=_LIGHT)
    _box(fig, 0.34, 0.62, 0.42, 0.86, f"X<br>[{B} × {d}]", fill=_LIGHT)
    _arrow(fig, 0.44, 0.74, 0.52, 0.74)
    _box(fig, 0.54, 0.62, 0.62, 0.86, f"∇W<br>[{m} × {d}]")
    fig.add_annotation(x=0.02, y=0.5, xanchor="left", showarrow=False, font=dict(size=13),
                       text="<b>Gram form</b>: G = (γ/σ)·(g − mean g − x̂ · mean(g x̂)) with g sparse, and "
                            "x̂ᵀX = (W·XᵀX + (b − μ)·1ᵀX)/σ")
    _box(fig, 0.04, 0.14, 0.20, 0.38, f"gᵀ X, sparse<br>{nnz} per token<br>{sparse / 1e9:.3g} GFLOP",
         colour=PALETTE[0], fill="#e8f0fa", size=11)
    _box(fig, 0.26, 0.14, 0.42, 0.38, f"Gram XᵀX<br>[{d} × {d}]<br>{gram / 1e9:.3g} GFLOP", colour=PALETTE[2],
         fill="#eaf6ea", size=11)
    _box(fig, 0.48, 0.14, 0.64, 0.38, f"W · XᵀX<br>[{m} × {d}]<br>{proj / 1e9:.3g} GFLOP", colour=PALETTE[2],
         fill="#eaf6ea", size=11)
    _arrow(fig, 0.66, 0.26, 0.74, 0.26)
    _box(fig, 0.76, 0.14, 0.98, 0.38, f"∇W = diag(γ/σ)·[gᵀX − mean(g)ᵀ 1ᵀX<br>− diag(mean g x̂)·x̂ᵀX]<br>"
         f"total {(sparse + gram + proj) / 1e9:.3g} GFLOP", size=11)
    fig.add_annotation(x=0.5, y=0.03, showarrow=False,
                       text=f"{dense / (sparse + gram + proj):.1f}x fewer FLOPs at B={B}, d={d}, m={m}; XᵀX and "
                            "W·XᵀX also give BatchNorm's variance in the forward pass, so the backward only adds "
                            "the sparse product<br>(valid when only the TopK, or TopK + AuxK, latents carry "
                            "gradient)")
    return _axes(fig, "The BatchNorm weight gradient through a Gram matrix", 420, width=980)


def bench_table(rows: Sequence[Mapping[str, Any]], title: str = "Training step: ours against the official step"
                ) -> go.Figure:
    """The benchmark rows (``usae.perf.runner.row`` dicts) as a table."""
    out = [{"what": r["what"], "ours": float(r["ours"]), "reference": float(r["reference"]), "unit": r["unit"],
            "ratio": round(float(r["ratio"]), 2), "target": "-" if r["target"] is None else f">= {r['target']:.3g}",
            "samples": r.get("samples", "-"),
            "met": "noisy" if r.get("noisy") else {True: "yes", False: "no", None: "-"}[r["passed"]]} for r in rows]
    return table(out, title=title, height=110 + 64 * len(out))  # "what" wraps to about three lines


def scaling_figure(rows: Sequence[Mapping[str, Any]], title: str = "Step time as one size varies") -> go.Figure:
    """Three panels (vs B, vs m, vs M) of rows {vary, value, impl, seconds}; log-log for B and m."""
    varies = [v for v in ("B", "m", "M") if any(r["vary"] == v for r in rows)]
    if not varies:
        raise ValueError("scaling_figure: expected rows with vary in 'B', 'm', 'M'")
    label = {"B": "batch B (tokens)", "m": "code width m", "M": "number of models M"}
    fig = make_subplots(rows=1, cols=len(varies), subplot_titles=[f"vs {label[v]}" for v in varies],
                        horizontal_spacing=0.08)
    for c, vary in enumerate(varies, start=1):
        for impl in ("reference", "ours"):
            pts = sorted((r["value"], r["seconds"]) for r in rows if r["vary"] == vary and r["impl"] == impl)
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                     name="official reference" if impl == "reference" else "ours",
                                     line=dict(color=IMPL_COLOURS[impl]), showlegend=c == 1), row=1, col=c)
        fig.update_xaxes(title_text=label[vary], type="log" if vary != "M" else None, row=1, col=c)
        fig.update_yaxes(type="log", row=1, col=c)
    fig.update_yaxes(title_text="seconds per step", row=1, col=1)
    fig.update_layout(title=title, height=400, margin=dict(l=60, r=20, t=80, b=50))
    return fig


def peers_figure(rows: Sequence[Mapping[str, Any]], title: str = "One training step per side, as m grows"
                 ) -> go.Figure:
    """Grouped bars of rows {side, m, median s, fastest s, slowest s} (``PeerComparison.table()``): the median
    seconds per step of each side at each width, the fastest and slowest sample as the error bar; log y."""
    if not rows:
        raise ValueError("peers_figure: expected at least one row")
    fig = go.Figure()
    for side in dict.fromkeys(r["side"] for r in rows):
        mine = sorted((r for r in rows if r["side"] == side), key=lambda r: r["m"])
        fig.add_trace(go.Bar(x=[f"m = {r['m']}" for r in mine], y=[r["median s"] for r in mine], name=side,
                             error_y=dict(type="data", symmetric=False,
                                          array=[r["slowest s"] - r["median s"] for r in mine],
                                          arrayminus=[r["median s"] - r["fastest s"] for r in mine])))
    fig.update_layout(title=title, barmode="group", height=420, margin=dict(l=60, r=20, t=70, b=50),
                      yaxis=dict(title="seconds per step (median; bars: fastest to slowest)", type="log"))
    return fig
