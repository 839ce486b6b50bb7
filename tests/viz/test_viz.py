import base64
import io

import numpy as np
import plotly.io as pio
import pytest
import torch
from PIL import Image

from usae import viz


def test_setup_notebook_keeps_the_mimetype_and_adds_html():
    viz.setup_notebook()
    assert pio.renderers.default == f"plotly_mimetype+{viz.BOOK_RENDERER}"
    html = pio.renderers[viz.BOOK_RENDERER].to_mimebundle(viz.table([{"a": 1}]).to_dict())["text/html"]
    assert "Plotly.newPlot" in html and "<script src" not in html  # uses the vendored plotly.js, no CDN


def test_image_grid_draws_every_image_and_rejects_bad_shapes():
    fig = viz.image_grid(torch.rand(5, 3, 8, 8), cols=3)
    assert len(fig.data) == 5 and fig.data[0].source.startswith("data:image/png;base64,")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(fig.data[0].source.split(",", 1)[1]))))
    assert shown.shape == (8, 8, 3)
    with pytest.raises(ValueError, match="3, H, W"):
        viz.image_grid(torch.rand(5, 8, 8))


def test_r2_heatmap_shows_the_values_in_model_order():
    m = np.array([[0.9, 0.3], [0.2, 0.8]])
    fig = viz.r2_heatmap(m, ["a", "b"])
    assert np.allclose(np.asarray(fig.data[0].z), m)
    assert fig.data[0].text[0][1] == "0.300" and list(fig.data[0].y) == ["encode a", "encode b"]


def test_heatmaps_share_one_colour_scale():
    fig = viz.heatmaps({"x": np.zeros((2, 2)), "y": np.full((3, 3), 5.0)})
    assert {(t.zmin, t.zmax) for t in fig.data} == {(0.0, 5.0)}


def test_update_rule_diagram_marks_what_is_stepped():
    paper = viz.update_rule_diagram(["a", "b", "c"], selected=1, update="paper")
    joint = viz.update_rule_diagram(["a", "b", "c"], selected=1, update="joint")
    bold = lambda fig: sum(1 for s in fig.layout.shapes if s.line.width == 4)  # noqa: E731
    assert bold(paper) == 2 and bold(joint) == 4  # encoder+decoder of b; b's encoder + all 3 decoders


def test_table_and_bars():
    fig = viz.table([{"name": "a", "value": 0.123456}, {"name": "b", "value": 2}])
    assert list(fig.data[0].cells.values[1]) == ["0.1235", "2"]
    with pytest.raises(ValueError):
        viz.table([])
    # long headers and cells wrap in narrow columns: the table grows so that no row is cut off
    short = viz.table([{f"c{i}": 1 for i in range(8)}] * 3).layout.height
    wrapped = viz.table([{f"column with a long header {i}": "a cell with a long text in it" for i in range(8)}] * 3)
    assert wrapped.layout.height > short + 100
    bars = viz.bars_with_chance({"x": 0.9}, {"x": 0.5}, title="t")
    assert bars.data[0].y == (0.9,) and bars.data[1].y == (0.5,)


def test_histograms_are_binned_here_on_shared_edges():
    rng = np.random.default_rng(0)
    samples = {"a": rng.normal(size=600_000), "b": np.append(rng.normal(2.0, size=1000), np.nan)}
    fig = viz.histograms(samples, title="t", nbins=40)
    assert [len(t.y) for t in fig.data] == [40, 40]          # 40 counts per trace, not 600 000 values
    assert np.array_equal(fig.data[0].x, fig.data[1].x)      # one set of bins for both
    assert sum(fig.data[0].y) == 600_000 and sum(fig.data[1].y) == 1000  # NaN left out
    assert len(fig.to_json()) < 20_000
