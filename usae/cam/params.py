"""Image parameterisations: what CAM optimises, and how it becomes an image.

Every parameterisation is an ``nn.Module`` whose ``forward()`` returns ``images [B, 3, S, S]`` in pixel units
(``[0, 1]`` is the displayable range; a model's own normalisation is applied later by its backbone):

- :class:`PixelImage`: one free logit per pixel and channel, through a sigmoid (optionally in decorrelated
  colours). The naive baseline.
- :class:`FourierImage`: Lucid's parameterisation. Free complex Fourier coefficients, scaled by
  ``1 / f^decay`` so that every frequency band starts at the same per-pixel scale, decorrelated colours,
  sigmoid.
- :class:`MacoImage`: MACO (Fel et al. 2023). The magnitude is fixed to an image set's average spectrum and
  only the phase is optimised. The phase is standardised and given Hermitian symmetry, then
  ``spatial = irfft2(M e^{i phi})``. The image is standardised, colour-recorrelated and squashed into
  ``value_range`` by a sigmoid. ``rfft2(spatial())`` has magnitude exactly ``magnitude``.

Each class names the optimiser and learning rate it is meant to be used with (``optimiser``, ``lr``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from usae._checks import int_at_least, positive_int
from usae.cam.spectrum import Spectrum, hermitian_columns, load_spectrum

__all__ = ["ImageParam", "PixelImage", "FourierImage", "MacoImage", "PARAMETERISATIONS", "make_param",
           "check_size", "check_value_range", "centre_offset"]

MIN_SIZE = 8


def check_size(size: object, name: str = "size") -> int:
    """An image side: an int >= 8; ValueError otherwise."""
    return int_at_least(name, size, MIN_SIZE)


def check_value_range(value_range: Sequence) -> Tensor:
    """(low, high) as scalars or per-channel triples -> [2, 3] tensor; ValueError unless low < high."""
    try:
        lo, hi = (torch.as_tensor(v, dtype=torch.float32).expand(3).clone() for v in value_range)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"value_range = {value_range!r} is not valid; expected (low, high) with scalars or "
                         "per-channel triples") from None
    if not bool((lo < hi).all()) or not bool(torch.isfinite(torch.stack([lo, hi])).all()):
        raise ValueError(f"value_range = {value_range!r} is not valid; expected finite low < high")
    return torch.stack([lo, hi])


def _squash(x: Tensor, value_range: Tensor, offset: Tensor | None = None) -> Tensor:
    """Sigmoid of ``x [B, 3, S, S]`` (plus a per-channel ``offset [3]``) into ``value_range [2, 3]``."""
    lo, hi = value_range[0].view(1, 3, 1, 1), value_range[1].view(1, 3, 1, 1)
    if offset is not None:
        x = x + offset.view(1, 3, 1, 1)
    return lo + (hi - lo) * torch.sigmoid(x)


def centre_offset(centre: Sequence[float] | Tensor, value_range: Tensor) -> Tensor:
    """Per-channel logit that makes ``x = 0`` land on ``centre [3]`` (pixel units) inside ``value_range``."""
    c = torch.as_tensor(centre, dtype=torch.float32).expand(3)
    frac = ((c - value_range[0]) / (value_range[1] - value_range[0])).clamp(0.02, 0.98)
    return torch.logit(frac)


def _recorrelate(x: Tensor, colour_sqrt: Tensor) -> Tensor:
    """Decorrelated colours ``x [B, 3, S, S]`` -> correlated ones: ``colour_sqrt @ x`` per pixel."""
    return torch.einsum("ij,bjhw->bihw", colour_sqrt, x)


def _standardise(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-8)


class ImageParam(nn.Module):
    """Base class: ``forward() -> [batch, 3, size, size]``; ``optimiser`` / ``lr``: the intended optimiser."""

    optimiser: str = "adam"
    lr: float = 0.05
    kind: str = "base"

    def __init__(self, size: int, batch: int = 1) -> None:
        super().__init__()
        self.size = check_size(size)
        self.batch = positive_int("batch", batch)

    def describe(self) -> str:
        return f"{self.kind} {self.size}x{self.size}"


class PixelImage(ImageParam):
    """One logit per pixel: ``sigmoid(logits)`` (or sigmoid of recorrelated logits with ``colour_sqrt``)."""

    kind = "pixel"

    def __init__(self, size: int, batch: int = 1, generator: torch.Generator | None = None, std: float = 0.01,
                 colour_sqrt: Tensor | None = None, value_range: Sequence = (0.0, 1.0)) -> None:
        super().__init__(size, batch)
        self.logits = nn.Parameter(torch.randn(batch, 3, size, size, generator=generator) * std)
        self.register_buffer("colour_sqrt", None if colour_sqrt is None else colour_sqrt.float().clone())
        self.register_buffer("value_range", check_value_range(value_range))

    def forward(self) -> Tensor:
        x = self.logits if self.colour_sqrt is None else _recorrelate(self.logits, self.colour_sqrt)
        return _squash(x, self.value_range)


def frequency_radius(size: int) -> Tensor:
    """|f| in cycles per pixel on the rfft2 grid of a ``size`` x ``size`` image: [size, size // 2 + 1]."""
    fy = torch.fft.fftfreq(size).abs()[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    return (fy.square() + fx.square()).sqrt()


class FourierImage(ImageParam):
    """Lucid's Fourier parameterisation: coefficients scaled by ``1 / max(|f|, 1/size)^decay`` (normalised to
    unit RMS), inverse rFFT (``norm="ortho"``), decorrelated colours, sigmoid into ``value_range``."""

    kind = "fourier"

    def __init__(self, size: int, batch: int = 1, generator: torch.Generator | None = None, std: float = 0.01,
                 decay: float = 1.0, colour_sqrt: Tensor | None = None, value_range: Sequence = (0.0, 1.0)) -> None:
        super().__init__(size, batch)
        shape = (batch, 3, size, size // 2 + 1, 2)
        self.coefficients = nn.Parameter(torch.randn(shape, generator=generator) * std)
        scale = 1.0 / frequency_radius(size).clamp_min(1.0 / size) ** float(decay)
        self.register_buffer("scale", scale / scale.square().mean().sqrt())
        if colour_sqrt is None:
            colour_sqrt = load_spectrum().colour_sqrt
        self.register_buffer("colour_sqrt", colour_sqrt.float().clone())
        self.register_buffer("value_range", check_value_range(value_range))

    def spatial(self) -> Tensor:
        """The decorrelated image before colours and sigmoid: [B, 3, S, S]."""
        coeffs = torch.view_as_complex(self.coefficients) * self.scale
        return torch.fft.irfft2(coeffs, s=(self.size, self.size), norm="ortho")

    def forward(self) -> Tensor:
        return _squash(_recorrelate(self.spatial(), self.colour_sqrt), self.value_range)


class MacoImage(ImageParam):
    """MACO: a fixed magnitude spectrum, an optimised phase (random-normal init); NAdam, lr 1.0.

    MACO works in a model's normalised input space, whose origin is the mean colour of the data its spectrum
    comes from (ImageNet); a standardised image of 0 maps to the middle of ``values_range``. In pixel units
    the same choice is ``centre``: the colour a zero standardised image takes (default: the spectrum's
    image-set mean colour, ``spectrum.meta["colour_mean"]``; ``None`` there: the middle of the range).
    """

    kind = "maco"
    optimiser = "nadam"
    lr = 1.0

    def __init__(self, size: int, batch: int = 1, generator: torch.Generator | None = None,
                 spectrum: Spectrum | None = None, value_range: Sequence = (0.0, 1.0),
                 centre: Sequence[float] | None = None) -> None:
        super().__init__(size, batch)
        spectrum = load_spectrum() if spectrum is None else spectrum
        self.phase = nn.Parameter(torch.randn(batch, 3, size, size // 2 + 1, generator=generator))
        self.register_buffer("magnitude", spectrum.magnitude_at(size))
        self.register_buffer("colour_sqrt", spectrum.colour_sqrt.float().clone())
        self.register_buffer("value_range", check_value_range(value_range))
        centre = spectrum.meta.get("colour_mean") if centre is None else centre
        self.register_buffer("offset", None if centre is None else centre_offset(centre, self.value_range))

    def effective_phase(self) -> Tensor:
        """The phase actually used: standardised per image, antisymmetric in the self-conjugate columns."""
        phase = _standardise(self.phase, (1, 2, 3))
        return hermitian_columns(phase, self.size, odd=True)

    def spatial(self) -> Tensor:
        """``irfft2(magnitude * exp(i phase))``: [B, 3, S, S], before standardisation, colours and sigmoid."""
        phase = self.effective_phase()
        spectrum = torch.polar(self.magnitude.expand_as(phase), phase)
        return torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")

    def forward(self) -> Tensor:
        x = _standardise(self.spatial(), (1, 2, 3))
        return _squash(_recorrelate(x, self.colour_sqrt), self.value_range, self.offset)


PARAMETERISATIONS = {"pixel": PixelImage, "fourier": FourierImage, "maco": MacoImage}


def make_param(kind: str, size: int, batch: int = 1, seed: int = 0, value_range: Sequence = (0.0, 1.0),
               spectrum: Spectrum | None = None) -> ImageParam:
    """A parameterisation by name (``"pixel"``, ``"fourier"``, ``"maco"``), initialised from ``seed``.

    ``spectrum`` (default: the committed toy-world one) gives MACO its magnitude and Fourier its colours.
    """
    if kind not in PARAMETERISATIONS:
        raise ValueError(f"parameterisation {kind!r} is not valid; expected one of {list(PARAMETERISATIONS)}")
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "pixel":
        return PixelImage(size, batch, gen, value_range=value_range)
    spectrum = load_spectrum() if spectrum is None else spectrum
    if kind == "fourier":
        return FourierImage(size, batch, gen, colour_sqrt=spectrum.colour_sqrt, value_range=value_range)
    return MacoImage(size, batch, gen, spectrum=spectrum, value_range=value_range)
