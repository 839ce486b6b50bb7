"""Benchmark of a toy-scale CAM render (``make bench`` entry ``"cam"``).

The issue's target: a 64 x 64 MACO render of 256 steps for one concept through one toy model (``toy_vit``)
and its USAE encoder takes at most 10 s on 2 CPU cores. The models are randomly initialised (the time does
not depend on the weights); the USAE has the book preset's width (m = 1024, k = 16).

Two rows:

- ``render vs 10 s target``: our :func:`usae.cam.render` with the book preset's CAM settings; ratio 10 s /
  time, target 1. The time is the render's wall time, or its CPU time when that is smaller: on a machine
  busy with other work the wall time measures the other work. A compute-bound render on dedicated cores
  takes at most its CPU time.
- ``render vs naive loop``: the same optimisation written the straightforward way. Each view is cropped by
  slicing (the book preset has no crops: the whole image) and resized with its own ``F.interpolate`` call,
  then run through the backbone alone; the full encoder ``encode_pre`` gives all m concepts, and column k is
  taken from it. Ratio naive / ours, target 1.

``usae bench cam [--quick]`` prints both rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usae.perf.rows import row
from usae.perf.timing import timed

TARGET_SECONDS = 10.0
STEPS = 256
CONCEPT = 3


def _setup(n_latents: int = 1024, k: int = 16):
    from usae import cam
    from usae.core.model import UniversalSAE
    from usae.data.zoo import Backbone, create_model, get_entry

    torch.manual_seed(0)
    name = "toy_vit"
    backbone = Backbone(get_entry(name), create_model(name, pretrained=False))
    sae = UniversalSAE({name: backbone.dim}, n_latents=n_latents, k=k)
    sae.set_standardisation(name, 0.0, 1.0)
    sae.eval()
    settings = cam.cam_settings("book")
    return name, {name: backbone}, sae, settings


def naive_render(name: str, backbones: dict, sae, settings, steps: int, seed: int = 0) -> torch.Tensor:
    """The reference: per-view slicing + interpolate, one backbone call per view, the full-width encoder."""
    from usae import cam

    backbone = backbones[name]
    param = cam.make_param(settings.param, settings.size, 1, seed)
    optimiser = torch.optim.NAdam(param.parameters(), lr=settings.lr or param.lr)
    gen = torch.Generator().manual_seed(seed)
    size, out = settings.size, backbone.entry.image_size
    lo, hi = settings.crop_size or (1.0, 1.0)
    for _ in range(steps):
        image = param()
        total = 0.0
        for _ in range(settings.n_views):
            side = int(round(size * (lo + (hi - lo) * float(torch.rand(1, generator=gen)))))
            centre = 0.5 + settings.centre_std * torch.randn(2, generator=gen)
            y0, x0 = (int(round(float(c) * size - side / 2)) for c in centre)
            y0, x0 = min(max(y0, 0), size - side), min(max(x0, 0), size - side)
            view = F.interpolate(image[:, :, y0:y0 + side, x0:x0 + side], size=(out, out), mode="bilinear",
                                 align_corners=False)  # (a copy even for a full-image "crop")
            view = view + settings.noise_std * torch.randn(view.shape, generator=gen) + \
                settings.noise_uniform * (torch.rand(view.shape, generator=gen) - 0.5)
            tokens = backbone(view).reshape(-1, backbone.dim)
            pre = sae.encode_pre(name, sae.standardise(name, tokens))     # [T, m]
            total = total + pre[:, CONCEPT].mean()
        optimiser.zero_grad()
        (-total / settings.n_views).backward()
        optimiser.step()
    return param().detach()


def bench_cam(quick: bool = False) -> list:
    from usae import cam

    name, backbones, sae, settings = _setup()
    steps = 48 if quick else STEPS
    settings = settings.replace(steps=steps)
    objective = cam.concept(name, CONCEPT, settings.reduce)
    cam.render(objective, backbones, sae, settings.replace(steps=4), progress=False)  # warm-up
    result = cam.render(objective, backbones, sae, settings, progress=False)
    ours, own = result.seconds, min(result.seconds, result.cpu_seconds)
    naive = timed(lambda: naive_render(name, backbones, sae, settings, steps))
    scale = STEPS / steps
    what = f"{settings.param} {settings.size}px {STEPS} steps {settings.n_views} views toy_vit"
    return [
        row("cam", f"{what} vs 10 s", own * scale, TARGET_SECONDS, "s", TARGET_SECONDS / (own * scale), 1.0),
        row("cam", "render vs naive per-view loop", ours * scale, naive * scale, "s", naive / ours, 1.0),
    ]
