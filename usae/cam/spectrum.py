"""The image statistics CAM's parameterisations start from: a colour matrix and an average magnitude spectrum.

MACO (Fel et al. 2023) keeps the Fourier *magnitude* of its image fixed to the average magnitude spectrum of
natural images and optimises only the phase; Lucid/Lucent's Fourier parameterisation draws colours in a
decorrelated colour space. Both need statistics of an image set. Ours are computed here, by our own code,
from the toy world (the committed ``data/spectrum_toy.npz``) or from any image folder; nothing is downloaded.

- ``colour_sqrt`` [3, 3]: the symmetric square root of the pixel colour covariance, divided by its largest
  column norm (Lucid's normalisation). ``rgb = colour_sqrt @ z`` maps decorrelated colours ``z`` to RGB.
- ``magnitude`` [3, S, S // 2 + 1]: the mean over images of ``|rfft2(z)|`` (``norm="ortho"``) of each image's
  decorrelated colour channels ``z = colour_sqrt^-1 (x - mean_x)`` at side ``S``, where ``mean_x`` is the
  image's own mean colour: the spectrum has no DC term, so an image's brightness and tint are left to the
  parameterisation's range (the sigmoid), not fixed by the spectrum.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from usae._checks import int_at_least, positive_int
from usae._io import atomic_write
from usae.config import repo_root

__all__ = ["Spectrum", "compute_spectrum", "toy_spectrum", "folder_spectrum", "default_spectrum_path",
           "load_spectrum", "hermitian_columns"]

SPECTRUM_FILE = "spectrum_toy.npz"


def hermitian_columns(x: Tensor, width: int, odd: bool) -> Tensor:
    """Make the self-conjugate columns of a half spectrum ``x [..., H, width // 2 + 1]`` consistent.

    In an rfft2 of a real image, column 0 (and column ``width / 2`` for even ``width``) holds both a frequency
    and its negative: entry ``[-h]`` must be the conjugate of entry ``[h]``. For a magnitude that means
    ``M[-h] = M[h]`` (``odd=False``: average with the row-reversed copy); for a phase ``phi[-h] = -phi[h]``
    (``odd=True``: the antisymmetric part, which is 0 at the self-conjugate entries h = 0, H / 2).
    """
    cols = [0] + ([width // 2] if width % 2 == 0 else [])
    out = x.clone()
    for c in cols:
        col = x[..., :, c]
        mirrored = torch.roll(torch.flip(col, dims=[-1]), 1, dims=-1)  # mirrored[h] = col[-h mod H]
        out[..., :, c] = 0.5 * (col - mirrored) if odd else 0.5 * (col + mirrored)
    return out


@dataclass
class Spectrum:
    """Colour and magnitude statistics of an image set (see the module docstring for the definitions)."""

    magnitude: Tensor      # [3, S, S // 2 + 1] float32
    colour_sqrt: Tensor    # [3, 3] float32
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.magnitude.shape[-2])

    def magnitude_at(self, size: int) -> Tensor:
        """The magnitude resized to an image of side ``size``: [3, size, size // 2 + 1].

        Frequencies are matched as fractions of the image side (rows are fft-shifted so that bilinear
        interpolation runs over contiguous frequencies), then the self-conjugate columns are symmetrised.
        """
        int_at_least("size", size, 2)
        mag = self.magnitude.float()
        if size != self.size:
            shifted = torch.fft.fftshift(mag, dim=-2)[None]
            resized = F.interpolate(shifted, size=(size, size // 2 + 1), mode="bilinear", align_corners=False,
                                    antialias=size < self.size)[0]
            mag = torch.fft.ifftshift(resized, dim=-2)
        return hermitian_columns(mag, size, odd=False).clamp_min(0.0)

    def save(self, path: str | Path) -> Path:
        """Write ``.npz`` (no pickles) atomically: magnitude, colour_sqrt and the JSON meta."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda tmp: np.savez_compressed(
            tmp, magnitude=self.magnitude.numpy().astype(np.float32),
            colour_sqrt=self.colour_sqrt.numpy().astype(np.float32), meta=np.array(json.dumps(self.meta))))

    @classmethod
    def load(cls, path: str | Path) -> Spectrum:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"spectrum file {str(path)!r} does not exist; compute one with toy_spectrum() or "
                             "folder_spectrum() and .save() it")
        with np.load(path, allow_pickle=False) as data:
            missing = {"magnitude", "colour_sqrt"} - set(data.files)
            if missing:
                raise ValueError(f"{str(path)!r} is not a spectrum file: it lacks {sorted(missing)}")
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
            spec = cls(torch.from_numpy(data["magnitude"]).float(), torch.from_numpy(data["colour_sqrt"]).float(),
                       meta)
        _check_spectrum(spec, str(path))
        return spec


def _check_spectrum(spec: Spectrum, where: str) -> None:
    mag, col = spec.magnitude, spec.colour_sqrt
    if mag.dim() != 3 or mag.shape[0] != 3 or mag.shape[2] != mag.shape[1] // 2 + 1:
        raise ValueError(f"{where}: magnitude has shape {tuple(mag.shape)}; expected [3, S, S // 2 + 1]")
    if col.shape != (3, 3):
        raise ValueError(f"{where}: colour_sqrt has shape {tuple(col.shape)}; expected [3, 3]")


def _colour_sqrt(images: Tensor) -> tuple[Tensor, Tensor]:
    """(mean [3], normalised symmetric sqrt of the colour covariance [3, 3]) of images [N, 3, H, W]."""
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double()
    mean = pixels.mean(1)
    cov = torch.cov(pixels)
    evals, evecs = torch.linalg.eigh(cov)
    sqrt = evecs @ torch.diag(evals.clamp_min(1e-12).sqrt()) @ evecs.T
    sqrt = sqrt / sqrt.norm(dim=0).max()
    return mean.float(), sqrt.float()


def compute_spectrum(load: Callable[[int, int], Tensor], n_images: int, batch_size: int = 256,
                     progress: bool = True, meta: dict[str, Any] | None = None) -> Spectrum:
    """Statistics of ``n_images`` square images ``load(start, count) -> [count, 3, S, S]`` in [0, 1].

    Two passes: colour statistics on the first batch (at most ``batch_size`` images), then the mean
    magnitude spectrum of the decorrelated images over all ``n_images``.
    """
    positive_int("n_images", n_images)
    first = _check_images(load(0, min(batch_size, n_images)))
    mean, sqrt = _colour_sqrt(first)
    inverse = torch.linalg.inv(sqrt)
    side = first.shape[-1]
    total = torch.zeros(3, side, side // 2 + 1, dtype=torch.float64)
    for start in tqdm(range(0, n_images, batch_size), desc="spectrum", disable=not progress):
        images = first if start == 0 else _check_images(load(start, min(batch_size, n_images - start)))
        if images.shape[-1] != side:
            raise ValueError(f"images have side {images.shape[-1]} but the first batch had {side}; resize them")
        z = torch.einsum("ij,njhw->nihw", inverse, images - images.mean((2, 3), keepdim=True))
        total += torch.fft.rfft2(z, norm="ortho").abs().sum(0).double()
    info = {"n_images": n_images, "size": side, "colour_mean": mean.tolist(), **(meta or {})}
    return Spectrum((total / n_images).float(), sqrt, info)


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or \
            images.shape[-1] != images.shape[-2]:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape} are not valid; expected square images [N, 3, S, S]")
    return images.float()


def toy_spectrum(world: Any = None, n_images: int = 1024, split: str = "train", progress: bool = True) -> Spectrum:
    """The spectrum of the toy world's ``split`` (default world: ``ToyWorldConfig()``)."""
    if world is None:
        from usae.config import ToyWorldConfig
        from usae.data.toyworld import ToyWorld

        world = ToyWorld(ToyWorldConfig())
    return compute_spectrum(lambda s, c: world.batch(split, s, c).images, n_images, progress=progress,
                            meta={"source": f"toy world ({split}, seed {world.cfg.seed})"})


def folder_spectrum(folder: str | Path, size: int = 224, n_images: int = 1024, progress: bool = True) -> Spectrum:
    """The spectrum of (at most ``n_images`` of) an image folder's images, resized to ``size`` x ``size``."""
    from usae.data.sources import ImageFolder

    images = ImageFolder(folder, image_size=size, shuffle=True, seed=0)
    n = min(n_images, len(images))
    return compute_spectrum(lambda s, c: images.load(range(s, s + c)), n, batch_size=64, progress=progress,
                            meta={"source": f"image folder {str(folder)!r}"})


def default_spectrum_path() -> Path:
    """``<repo>/data/spectrum_toy.npz``: the committed spectrum of the default toy world."""
    return repo_root() / "data" / SPECTRUM_FILE


def load_spectrum(path: str | Path | None = None) -> Spectrum:
    """The spectrum at ``path``; by default the committed toy-world one (computed and saved if missing)."""
    if path is not None:
        return Spectrum.load(path)
    default = default_spectrum_path()
    if not default.is_file():
        toy_spectrum(progress=False).save(default)
    return Spectrum.load(default)
