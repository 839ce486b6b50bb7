"""usae.viz.concepts: figures build with the expected traces; the statistics they draw (universality.entropy_histogram,
universality.cfp_mean_curve) against numpy references."""

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from usae.core.sparse import SparseCode
from usae.stats import concepts, universality
from usae.stats.consistency import consistency
from usae.stats.firing import FiringStats
from usae.stats.galleries import Gallery
from usae.stats.groundtruth import GroundTruthAccumulator
from usae.viz import concepts as vc
from usae.viz import groundtruth as vg

NAMES = ("a", "b", "c")


def make_stats(m: int = 40, seed: int = 0) -> FiringStats:
    g = torch.Generator().manual_seed(seed)
    fires = torch.randint(0, 200, (3, m), generator=g)
    fires[:, :3] = 0                                                  # never fired
    fires[1:, 3:6] = 0                                                # fire in one model only
    fires[:, 6:12] = torch.tensor([50, 50, 50])[:, None]              # uniform: entropy 1
    cof = torch.minimum(fires.min(0).values, torch.randint(0, 60, (m,), generator=g))
    act = torch.rand(3, m, generator=g, dtype=torch.float64) * fires
    return FiringStats(NAMES, 0.1, 1000, fires, cof, act, fires.clone(), torch.ones(3, m, dtype=torch.float64))


def gallery(concept: int, n: int = 3, g: int = 4, scale: float = 1.0) -> Gallery:
    gen = torch.Generator().manual_seed(concept)
    maps = {name: scale * (i + 1) * torch.rand(n, g, g, generator=gen) for i, name in enumerate(NAMES)}
    return Gallery(concept, "val", torch.arange(n), torch.rand(n, generator=gen), torch.rand(n, 3, 16, 16), maps)


def test_entropy_histogram_counts_fired_concepts_and_reports_never_fired():
    st = make_stats()
    counts, edges, never = universality.entropy_histogram(st, 30)
    h = st.entropy.numpy()
    want, _ = np.histogram(h[~np.isnan(h)], bins=30, range=(0, 1))
    assert never == 3 and counts.tolist() == want.tolist() and int(counts.sum()) == st.n_latents - 3
    assert counts[-1] >= 6 and counts[0] >= 3                         # entropy 1 in the last bin, 0 in the first
    fig = vc.entropy_histogram_figure(st)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(bars) == 1 and len(bars[0].x) == 30 and list(bars[0].y) == counts.tolist()
    assert "never-fired" in fig.layout.title.text and ": 3)" in fig.layout.title.text
    two = vc.entropy_histogram_figure({"val": st, "ood": make_stats(seed=1)})
    assert len(two.data) == 2 and math.isclose(sum(two.data[0].y), 1.0)


def test_cofire_proportion_figure_has_sorted_curves_means_and_the_mean_curve():
    st = make_stats()
    fig = vc.cofire_proportion_figure(st, top=20)
    assert len(fig.data) == 4                                         # 3 models + mean curve
    curves, means = universality.cfp_curves(st, 20)
    for i, name in enumerate(NAMES):
        assert fig.data[i].name == f"{name} (mean {float(means[i]):.3f})"
        assert np.all(np.diff(fig.data[i].y) <= 0)
    order = concepts.concept_order(st)[:20]
    want = np.sort(st.cofire_proportion[:, order].nan_to_num(0).mean(0).numpy())[::-1]
    np.testing.assert_allclose(fig.data[3].y, want)


def test_energy_cofire_figure_reports_fits_for_both_panels():
    st = make_stats()
    fig = vc.energy_cofire_figure(st, min_cofires=20)
    fit_all = universality.energy_cofire_fit(st, 1)
    fit_min = universality.energy_cofire_fit(st, 20)
    titles = [a.text for a in fig.layout.annotations]
    assert f"r = {fit_all.pearson_r:.2f}" in titles[0] and f"slope = {fit_min.slope:.2f}" in titles[1]
    markers = [t for t in fig.data if t.mode == "markers"]
    assert len(markers[0].x) == fit_all.n_concepts and len(markers[1].x) == fit_min.n_concepts
    assert fig.layout.xaxis.type == "log" and "official code" in fig.layout.yaxis.title.text


def test_gallery_shares_one_colour_scale_across_models():
    g = gallery(7)
    fig = vc.gallery_figure(g.images, g.heatmaps, captions=g.captions, title="t")
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    imgs = [t for t in fig.data if isinstance(t, go.Image)]
    assert len(heat) == len(imgs) == 3 * 3
    zmax = {t.zmax for t in heat}
    assert {t.zmin for t in heat} == {0.0} and len(zmax) == 1 and zmax.pop() == pytest.approx(g.peak)
    assert sum(bool(t.showscale) for t in heat) == 1
    assert all(t.source.startswith("data:image/png;base64,") for t in imgs)
    shared = vc.gallery_figure(g.images, g.heatmaps, zmax=10.0)
    assert {t.zmax for t in shared.data if isinstance(t, go.Heatmap)} == {10.0}
    with pytest.raises(ValueError, match="heatmaps"):
        vc.gallery_figure(g.images, {"a": torch.zeros(2, 4, 4)})


def test_explorer_has_one_dropdown_entry_per_concept_showing_only_its_traces():
    st = make_stats()
    gals = {k: gallery(k) for k in (6, 7, 20)}
    fig = vc.concept_explorer(st, gals)
    buttons = fig.layout.updatemenus[0].buttons
    assert len(buttons) == 3
    per_concept = 1 + 2 * 3 * 3                                       # highlight + (image, heatmap) per cell
    n_fixed = len(fig.data) - 3 * per_concept
    for j, b in enumerate(buttons):
        vis = b.args[0]["visible"]
        assert len(vis) == len(fig.data) and sum(vis) == n_fixed + per_concept
        assert all(vis[n_fixed + j * per_concept: n_fixed + (j + 1) * per_concept])
    for j, k in enumerate(gals):                                     # each concept: one scale for its models
        heat = [t for t in fig.data[n_fixed + j * per_concept:n_fixed + (j + 1) * per_concept]
                if isinstance(t, go.Heatmap)]
        zmax = {t.zmax for t in heat}
        assert len(heat) == 9 and len(zmax) == 1 and zmax.pop() == pytest.approx(gals[k].peak)
    shown = np.flatnonzero(~st.never_fired.numpy() & (st.aggregated_energy > 0).numpy())
    hover = dict(zip(shown, fig.data[0].text, strict=True))
    assert hover[6].startswith("concept 6<br>") and "CFP: a " in hover[6]
    with pytest.raises(ValueError):
        vc.concept_explorer(st, {})


def test_matched_cosine_and_truth_figures_build():
    g = torch.Generator().manual_seed(0)
    reports = {n: consistency(torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)) for n in NAMES}
    fig = vc.matched_cosine_figure(reports)
    lines = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert len(lines) == 6 and f"AUC {reports['a'].matching.auc:.2f}" in lines[0].name
    acc = GroundTruthAccumulator(NAMES, 6)
    for _ in range(2):
        acc.update({n: SparseCode(torch.rand(10, 2, generator=g), torch.rand(10, 6, generator=g).topk(2).indices, 6)
                    for n in NAMES})
    gt = acc.result({"color": torch.randint(-1, 3, (20,), generator=g)}, value_names={"color": ("r", "g", "b")})
    heat = vg.auroc_heatmap(gt, [0, 2, 5])
    assert heat.data[0].z.shape == (3, 3) and list(heat.data[0].x) == ["color:r", "color:g", "color:b"]
    rec = vg.recovery_figure(gt)
    assert len(rec.data) == 4 and len(rec.data[0].x) == 3


def test_explorer_widget_computes_a_gallery_per_choice():
    from types import SimpleNamespace

    from usae.core.model import UniversalSAE

    torch.manual_seed(0)
    dims = {"a": 4, "b": 5, "c": 3}
    model = UniversalSAE(dims, n_latents=8, k=3).eval()
    acts = {n: torch.randn(5 * 4, d) for n, d in dims.items()}          # 5 images of 2 x 2 tokens
    world = SimpleNamespace(batch=lambda split, i, n: SimpleNamespace(images=torch.full((n, 3, 8, 8), i / 10)))
    acts_with_grid = type("Acts", (dict,), {"grid": 2})(acts)
    w = vc.explorer_widget(model, acts_with_grid, world, make_stats(m=8), [1, 4], n_images=3)
    pick, pool = w.children[0].children
    out = w.children[1]
    first = out.outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert sum(t["type"] == "heatmap" for t in first["data"]) == 3 * 3
    pick.value = 4
    assert "gallery of concept 4" in out.outputs[0]["data"]["text/plain"]
    pool.value = "max"
    assert len(out.outputs) == 1


def _truth(m: int = 8):
    g = torch.Generator().manual_seed(3)
    acc = GroundTruthAccumulator(NAMES, m)
    labels = torch.randint(-1, 3, (40,), generator=g)
    for b in range(2):
        lab = labels[b * 20:(b + 1) * 20]
        codes = {}
        for n in NAMES:                      # concept 0 fires exactly on value 1 in every model: recovered
            idx = torch.stack([torch.zeros(20, dtype=torch.int64), 1 + torch.randint(0, m - 1, (20,), generator=g)], 1)
            vals = torch.stack([(lab == 1).float(), torch.rand(20, generator=g)], 1)
            codes[n] = SparseCode(vals, idx, m)
        acc.update(codes)
    return acc.result({"color": labels}, value_names={"color": ("r", "g", "b")})


def test_recovery_and_group_tables():
    from types import SimpleNamespace

    from usae.stats.groundtruth import group_truth
    from usae.stats.levels import factor_recovery

    gt = _truth()
    row = factor_recovery(gt, [SimpleNamespace(factor="color", level="low", models=NAMES, expected="universal")],
                          0.99)[0].row()
    assert row["factor"] == "color" and row["one concept, every model"] >= 1 and bool(gt.recovered(0.99)["color"][1])
    assert all(row[n] >= 1 for n in NAMES)
    groups = {"planted": torch.arange(8) == 0, "rest": torch.arange(8) > 0}
    rows = group_truth(gt, groups, 0.99)
    assert rows[0]["concepts"] == 1 and rows[0]["median worst-model AUROC"] == 1.0
    assert rows[1]["median worst-model AUROC"] < 0.9
    st = make_stats(m=8)
    fig = vg.truth_scatter(st, gt)
    assert len(fig.data[0].x) == int((~st.never_fired).sum()) and "color:" in fig.data[0].text[0]


def test_concept_groups_are_disjoint_and_cover_every_concept():
    st = make_stats(m=60)
    groups = concepts.concept_groups(st)
    total = sum(g.long() for g in groups.values())
    assert (total == 1).all()
    assert groups["never fired"][:3].all() and groups["unique"][3:6].all()
    assert set(concepts.universal_concepts(st).tolist()) == set(torch.nonzero(groups["universal"]).reshape(-1).tolist())
