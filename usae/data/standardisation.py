"""``Standardisation``: the per-model affine map ``(x - mean) / (std + eps)`` applied to activations at extraction.

The statistics are fitted by ``usae.data.extract.fit_standardisation`` and stored in the activation store's manifest
(``to_dict`` / ``from_dict``); ``invert`` maps standardised rows back to the backbone's units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

STANDARDISE_MODES = ("scalar", "channel", "none")
__all__ = ["Standardisation", "STANDARDISE_MODES"]


@dataclass(frozen=True)
class Standardisation:
    """Per-model affine standardisation ``(x - mean) / (std + eps)`` (the paper: one scalar per model).

    ``mean``/``std``: ``[]`` for ``mode="scalar"``, ``[D]`` for ``"channel"``; ``mode="none"`` is the identity.
    """

    mean: Tensor
    std: Tensor
    mode: str = "scalar"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode not in STANDARDISE_MODES:
            raise ValueError(f"Standardisation.mode = {self.mode!r} is not valid; expected one of "
                             f"{list(STANDARDISE_MODES)}")
        want = 1 if self.mode == "channel" else 0
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dim() != want:
                raise ValueError(f"Standardisation.{name} must be a {want}-d tensor for mode {self.mode!r}, "
                                 f"got {value!r}")
        object.__setattr__(self, "mean", self.mean.detach().to("cpu", torch.float32))
        object.__setattr__(self, "std", self.std.detach().to("cpu", torch.float32))

    @classmethod
    def identity(cls) -> "Standardisation":
        return cls(torch.tensor(0.0), torch.tensor(1.0), "none")

    def apply(self, x: Tensor) -> Tensor:
        """``x [..., D]`` -> float32 standardised ``[..., D]``."""
        x = x.float()
        if self.mode == "none":
            return x
        mean, scale = self.mean.to(x.device), (1.0 / (self.std + self.eps)).to(x.device)
        return (x - mean).mul_(scale)

    def invert(self, x: Tensor) -> Tensor:
        """Back to the backbone's units: ``x * (std + eps) + mean``."""
        if self.mode == "none":
            return x
        return x * (self.std + self.eps).to(x.device) + self.mean.to(x.device)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "eps": self.eps, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Standardisation":
        return cls(torch.tensor(data["mean"], dtype=torch.float32), torch.tensor(data["std"], dtype=torch.float32),
                   data["mode"], float(data["eps"]))
