"""Figures only (plotly): every function takes computed results and returns a figure.

- ``core`` (re-exported here): image grids, heatmaps, tables, lines, the R² matrix, the update-rule diagram;
- ``concepts``: concept galleries, universality scatter plots, the concept explorer;
- ``groundtruth``: concepts against the toy world's truth (recovery per level, the paper's bar as a detector);
- ``perf``: benchmark tables, FLOP and timing bars, kernel diagrams;
- ``cam``: CAM images and their comparisons with exemplars.
"""

from usae.viz.core import (
    BOOK_RENDERER,
    PALETTE,
    bars_with_chance,
    grouped_bars,
    heatmaps,
    histograms,
    image_grid,
    label_maps,
    lines,
    png_uri,
    r2_heatmap,
    seeds_headroom_figure,
    setup_notebook,
    table,
    update_rule_diagram,
)

__all__ = ["BOOK_RENDERER", "PALETTE", "bars_with_chance", "grouped_bars", "heatmaps", "histograms",
           "image_grid", "label_maps", "lines", "png_uri", "r2_heatmap", "seeds_headroom_figure", "setup_notebook",
           "table", "update_rule_diagram"]
