"""Figures for CAM: exemplars with heatmaps beside the CAM images, transparency blends, optimisation curves.

Pictures are composed as arrays here (heatmap overlays, MACO's alpha blend) and laid out by
``usae.viz.core.image_grid``. Heatmaps of one concept share one colour scale across models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.colors import sample_colorscale
from torch import Tensor

from usae import viz

__all__ = ["overlay", "blend", "concept_figure", "param_figure", "curves_figure"]


def overlay(images: Tensor, maps: Tensor, vmax: float, colorscale: str = "Inferno", strength: float = 0.6) -> Tensor:
    """Heatmaps ``maps [N, G, G]`` (clipped to [0, vmax]) laid over ``images [N, 3, H, W]`` -> [N, 3, H, W].

    Each map is upsampled (nearest, so tokens stay visible as squares) and coloured; where it is 0 the image
    shows through, dimmed; where it is ``vmax`` the colour covers ``strength`` of the pixel.
    """
    if images.dim() != 4 or maps.dim() != 3 or images.shape[0] != maps.shape[0]:
        raise ValueError(f"overlay: images {tuple(images.shape)} and maps {tuple(maps.shape)} do not match; "
                         "expected [N, 3, H, W] and [N, G, G]")
    level = (maps.float().clamp_min(0) / max(float(vmax), 1e-8)).clamp(0, 1)
    level = F.interpolate(level[:, None], size=images.shape[-2:], mode="nearest")       # [N, 1, H, W]
    lut = torch.tensor([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in
                        _hex(sample_colorscale(colorscale, list(np.linspace(0, 1, 256))))])  # [256, 3]
    colour = lut[(level[:, 0] * 255).round().long()].permute(0, 3, 1, 2)              # [N, 3, H, W]
    base = images.float().clamp(0, 1) * 0.55
    return base * (1 - strength * level) + colour * strength * level


def _hex(colours: Sequence[str]) -> list[str]:
    out = []
    for c in colours:
        if c.startswith("#"):
            out.append(c)
        else:  # "rgb(r, g, b)"
            r, g, b = (int(float(v)) for v in c[c.index("(") + 1:c.index(")")].split(","))
            out.append(f"#{r:02x}{g:02x}{b:02x}")
    return out


def blend(image: Tensor, alpha: Tensor, percentile: float = 90.0, background: float = 1.0) -> Tensor:
    """MACO's display: ``image [3, S, S]`` faded into ``background`` where the transparency ``alpha [S, S]``
    (accumulated gradient magnitude) is low; alpha is scaled by its ``percentile`` and clipped to [0, 1]."""
    a = alpha.float()
    scale = float(torch.quantile(a.flatten(), percentile / 100.0)) if a.numel() else 1.0
    a = (a / max(scale, 1e-12)).clamp(0, 1)[None]
    return image.float().clamp(0, 1) * a + background * (1 - a)


def _blank(size: int) -> Tensor:
    return torch.ones(3, size, size)


def concept_figure(study, show: int = 5, title: str | None = None) -> go.Figure:
    """One row per model: its top exemplars with heatmaps of the concept (one colour scale for all models),
    then its CAM image and the image faded by its transparency; a last row with the consensus image."""
    names = list(study.cams)
    size = study.cams[names[0]].image.shape[-1]
    vmax = max(float(study.exemplars[n].maps[:show].max()) for n in names)
    cells, titles = [], []
    for n in names:
        ex = study.exemplars[n]
        imgs = study.exemplar_images[n][:show]
        ov = overlay(imgs, ex.maps[:len(imgs)], vmax)
        ov = F.interpolate(ov, size=(size, size), mode="bilinear", align_corners=False) if ov.shape[-1] != size else ov
        cells += list(ov) + [_blank(size)] * (show - len(imgs))
        titles += [f"{n} #{int(i)}: {float(s):.2f}" for i, s in zip(ex.image_ids[:show], ex.scores[:show], strict=True)]
        titles += [""] * (show - len(imgs))
        cam = study.cams[n]
        cells += [cam.image.clamp(0, 1), blend(cam.image, cam.alpha[0])]
        titles += [f"CAM via {n}", "CAM × transparency"]
    if study.consensus is not None:
        cells += [_blank(size)] * show + [study.consensus.image.clamp(0, 1),
                                          blend(study.consensus.image, study.consensus.alpha[0])]
        titles += [""] * show + ["consensus (all models)", "consensus × transparency"]
    return viz.image_grid(torch.stack(cells), titles=titles, cols=show + 2, size=105,
                          title=title or f"Concept {study.k} {study.label}".strip())


def param_figure(results: Mapping[str, object], title: str) -> go.Figure:
    """The CAM image of each parameterisation (``results[name]`` is a CamResult), raw and faded."""
    cells, titles = [], []
    for name, r in results.items():
        cells += [r.image.clamp(0, 1), blend(r.image, r.alpha[0])]
        titles += [name, f"{name} × transparency"]
    return viz.image_grid(torch.stack(cells), titles=titles, cols=2 * len(results), size=120, title=title)


def curves_figure(results: Mapping[str, object], title: str) -> go.Figure:
    """The objective over optimisation steps for several renders (``results[name].history [steps, B]``)."""
    series = {name: (np.arange(1, r.history.shape[0] + 1), r.history[:, 0].numpy()) for name, r in results.items()}
    return viz.lines(series, title=title, xaxis="step", yaxis="objective (pre-TopK activation)")
