"""Transforms: the random views of the image that each optimisation step shows the models.

A :class:`Views` pipeline turns one image ``[B, 3, S, S]`` into ``n`` views per image at a model's own input
resolution. The geometric transforms (:class:`Crops`, :class:`Jitter`, :class:`Scale`, :class:`Rotate`) are
affine maps: their matrices are sampled once per step (shared by every model, so consensus mode shows all
models the same views), multiplied together, and applied with a *single* ``grid_sample`` per model.
MACO's crops are then followed by pixel noise (:class:`Noise`). Each model's own normalisation is not
done here: ``usae.data.zoo.Backbone`` takes images in [0, 1] and normalises them itself.

Coordinates are ``F.affine_grid``'s: ``[-1, 1]`` across the image. A matrix maps output (view)
coordinates to input (image) coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from usae._checks import positive_int

__all__ = ["Crops", "Jitter", "Scale", "Rotate", "Noise", "Views", "views_from"]


def _eye(n: int) -> Tensor:
    return torch.eye(3).expand(n, 3, 3).clone()


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


@dataclass(frozen=True)
class Crops:
    """MACO's random crops: side ``~ U(size)`` (fraction of the image side), centre ``~ N(0.5, centre_std)``
    per axis, clamped so that the crop stays inside the image."""

    size: tuple[float, float] = (0.25, 0.30)
    centre_std: float = 0.15

    def __post_init__(self) -> None:
        lo, hi = self.size
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"Crops.size = {self.size!r} is not valid; expected 0 < low <= high <= 1")
        if self.centre_std < 0:
            raise ValueError(f"Crops.centre_std = {self.centre_std!r} is not valid; expected >= 0")

    def matrices(self, n: int, image_size: int, gen: torch.Generator) -> Tensor:
        side = _uniform(n, *self.size, gen)
        centre = 0.5 + self.centre_std * torch.randn(n, 2, generator=gen)
        centre = torch.minimum(torch.maximum(centre, side[:, None] / 2), 1 - side[:, None] / 2)
        out = _eye(n)
        out[:, 0, 0] = out[:, 1, 1] = side
        out[:, :2, 2] = 2 * centre - 1
        return out


@dataclass(frozen=True)
class Jitter:
    """A random shift of up to ``pixels`` image pixels per axis (uniform)."""

    pixels: float = 2.0

    def matrices(self, n: int, image_size: int, gen: torch.Generator) -> Tensor:
        out = _eye(n)
        out[:, :2, 2] = (2 * torch.rand(n, 2, generator=gen) - 1) * self.pixels * 2.0 / image_size
        return out


@dataclass(frozen=True)
class Scale:
    """A random zoom by a factor ``~ U(scales)`` (> 1 magnifies)."""

    scales: tuple[float, float] = (0.9, 1.1)

    def __post_init__(self) -> None:
        if not 0.0 < self.scales[0] <= self.scales[1]:
            raise ValueError(f"Scale.scales = {self.scales!r} is not valid; expected 0 < low <= high")

    def matrices(self, n: int, image_size: int, gen: torch.Generator) -> Tensor:
        out = _eye(n)
        out[:, 0, 0] = out[:, 1, 1] = 1.0 / _uniform(n, *self.scales, gen)
        return out


@dataclass(frozen=True)
class Rotate:
    """A random rotation by an angle ``~ U(-degrees, degrees)``."""

    degrees: float = 5.0

    def matrices(self, n: int, image_size: int, gen: torch.Generator) -> Tensor:
        angle = _uniform(n, -self.degrees, self.degrees, gen) * math.pi / 180
        out = _eye(n)
        out[:, 0, 0], out[:, 0, 1] = angle.cos(), -angle.sin()
        out[:, 1, 0], out[:, 1, 1] = angle.sin(), angle.cos()
        return out


@dataclass(frozen=True)
class Noise:
    """MACO's pixel noise: Gaussian with std ``std`` plus uniform noise of width ``uniform`` (centred)."""

    std: float = 0.05
    uniform: float = 0.05

    def __call__(self, views: Tensor, gen: torch.Generator) -> Tensor:
        noise = torch.randn(views.shape, generator=gen) * self.std
        if self.uniform:
            noise += (torch.rand(views.shape, generator=gen) - 0.5) * self.uniform
        return views + noise.to(views.device, views.dtype)


Geometric = Crops | Jitter | Scale | Rotate


@dataclass(frozen=True)
class Views:
    """``n`` random views per image: geometric transforms (fused into one affine map; the first in the list
    is the outermost, e.g. a crop of a jittered, rotated image), then pixel transforms."""

    n: int = 6
    geometric: tuple[Geometric, ...] = (Crops(),)
    pixel: tuple[Noise, ...] = (Noise(),)
    padding: str = "reflection"

    def __post_init__(self) -> None:
        positive_int("Views.n", self.n)
        if self.padding not in ("zeros", "border", "reflection"):
            raise ValueError(f"Views.padding = {self.padding!r} is not valid; expected zeros, border or reflection")
        object.__setattr__(self, "geometric", tuple(self.geometric))
        object.__setattr__(self, "pixel", tuple(self.pixel))

    def sample(self, batch: int, image_size: int, gen: torch.Generator) -> Tensor:
        """Affine matrices ``[batch * n, 2, 3]`` (view b * n + v is view v of image b)."""
        total = _eye(batch * self.n)
        for t in self.geometric:
            total = total @ t.matrices(batch * self.n, image_size, gen)
        return total[:, :2, :]

    def apply(self, images: Tensor, theta: Tensor, out_size: int, gen: torch.Generator) -> Tensor:
        """``images [B, 3, S, S]`` -> views ``[B * n, 3, out_size, out_size]`` (bilinear, one grid_sample)."""
        b = images.shape[0]
        if theta.shape[0] != b * self.n:
            raise ValueError(f"theta has {theta.shape[0]} matrices; expected batch * n = {b * self.n}")
        source = images.expand(self.n, -1, -1, -1) if b == 1 else images.repeat_interleave(self.n, dim=0)
        grid = F.affine_grid(theta.to(images.device, images.dtype), [b * self.n, 3, out_size, out_size],
                             align_corners=False)
        views = F.grid_sample(source, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)
        for t in self.pixel:
            views = t(views, gen)
        return views

    def __call__(self, images: Tensor, out_size: int, gen: torch.Generator) -> Tensor:
        return self.apply(images, self.sample(images.shape[0], images.shape[-1], gen), out_size, gen)

    def describe(self) -> str:
        parts = [type(t).__name__ for t in (*self.geometric, *self.pixel)]
        return f"{self.n} views: " + " -> ".join(parts or ["identity"])


def views_from(n: int, crop_size: Sequence[float] | None, centre_std: float = 0.15, jitter: float = 0.0,
               scale: Sequence[float] | None = None, rotate: float = 0.0, noise_std: float = 0.05,
               noise_uniform: float = 0.05) -> Views:
    """A :class:`Views` pipeline from plain settings (a transform is left out when its setting is off)."""
    geo: list = []
    if crop_size is not None:
        geo.append(Crops(tuple(crop_size), centre_std))
    if jitter:
        geo.append(Jitter(jitter))
    if scale is not None and tuple(scale) != (1.0, 1.0):
        geo.append(Scale(tuple(scale)))
    if rotate:
        geo.append(Rotate(rotate))
    pixel = (Noise(noise_std, noise_uniform),) if (noise_std or noise_uniform) else ()
    return Views(n, tuple(geo), pixel)
