"""Loading the released checkpoints of the official code (github.com/YorkUCVIL/UniversalSAE) into a UniversalSAE.

The official training writes one file per model, ``uni_<Model>_checkpoint_<epoch>.pth``, holding that model's
TopK SAE state dict, possibly nested under a key (``"model"``, ``"state_dict"``, ...) next to optimizer state:

- ``encoder.final_block.0.weight`` [m, d], ``.bias`` [m]                      (Linear)
- ``encoder.final_block.1.weight/bias/running_mean/running_var/num_batches_tracked``  (BatchNorm1d)
- ``dictionary._weights`` [m, d]                                              (raw, rows normalised on use)

Files are read with ``torch.load(weights_only=True)``: nothing but tensors and plain containers is unpickled.
k is not stored in the files (the released config uses 32). The released per-model scalar standardisation
statistics are attached when the model names match (``OFFICIAL_STANDARDISATION``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from usae.core.model import UniversalSAE

__all__ = ["OFFICIAL_ORDER", "OFFICIAL_STANDARDISATION", "find_official_checkpoints", "load_official",
           "official_state_dict"]

OFFICIAL_ORDER = ("SigLIP", "DinoV2", "ViT")  # the official model_zoo order (R² matrix indices)
OFFICIAL_STANDARDISATION = {  # released (mean, std), applied as (a - mean) / (std + 1e-5)
    "SigLIP": (-0.030537, 2.231515),
    "DinoV2": (0.032905, 2.474064),
    "ViT": (-0.028633, 2.137650),
}
_FILE = re.compile(r"^uni_(?P<name>.+)_checkpoint_(?P<epoch>\d+)\.pth$")
_LINEAR, _BN, _DICT = "encoder.final_block.0.", "encoder.final_block.1.", "dictionary._weights"
_NEST_KEYS = ("model", "state_dict", "model_state_dict", "sae", "sae_state_dict", "module")


def find_official_checkpoints(root: str | Path, epoch: int | None = None) -> dict[str, Path]:
    """Map model name -> checkpoint file under ``root`` (searched recursively; latest epoch unless given)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory of official checkpoints")
    best: dict[str, tuple[int, Path]] = {}
    for path in sorted(root.rglob("uni_*_checkpoint_*.pth")):
        match = _FILE.match(path.name)
        if not match:
            continue
        name, ep = match["name"], int(match["epoch"])
        if (epoch is None or ep == epoch) and (name not in best or ep > best[name][0]):
            best[name] = (ep, path)
    if not best:
        wanted = "uni_<Model>_checkpoint_<epoch>.pth" + (f" with epoch {epoch}" if epoch is not None else "")
        raise ValueError(f"no {wanted} files under {root}")
    order = [n for n in OFFICIAL_ORDER if n in best] + sorted(n for n in best if n not in OFFICIAL_ORDER)
    return {n: best[n][1] for n in order}


def _find_state(obj: Any, depth: int = 0) -> dict[str, Tensor] | None:
    if not isinstance(obj, Mapping) or depth > 3:
        return None
    keys = [k for k in obj if isinstance(k, str)]
    for prefix in ("", "module.", "sae.", "model."):
        if prefix + _DICT in obj:
            return {k[len(prefix):]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(prefix)}
    for key in [k for k in _NEST_KEYS if k in obj] + [k for k in keys if k not in _NEST_KEYS]:
        found = _find_state(obj[key], depth + 1)
        if found is not None:
            return found
    return None


def official_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The SAE state dict inside one official checkpoint file (keys as listed in the module docstring)."""
    try:
        file = str(path)
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable or refusing to unpickle: same user error
        raise ValueError(f"{path}: cannot read it as a weights-only torch checkpoint ({err})") from err
    state = _find_state(obj)
    if state is None:
        raise ValueError(f"{path}: no '{_DICT}' entry found (top-level keys: "
                         f"{list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__})")
    needed = [_LINEAR + "weight", _LINEAR + "bias", _DICT]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"{path}: not a complete official USAE checkpoint: missing {missing}; found "
                         f"{sorted(state)}; expected the TopK SAE state dict of github.com/YorkUCVIL/UniversalSAE "
                         f"({needed + [_BN + 'weight', '...']})")
    return state


def load_official(checkpoints: str | Path | Mapping[str, str | Path], k: int = 32, *,
                  standardisation: Mapping[str, tuple[float, float]] | None = OFFICIAL_STANDARDISATION,
                  epoch: int | None = None) -> UniversalSAE:
    """Build a UniversalSAE from official checkpoint files.

    checkpoints: a directory (searched for ``uni_<Model>_checkpoint_<epoch>.pth``, official model order) or a
    mapping model name -> file (its order is the model order). ``standardisation``: (mean, std) per model
    name, attached where names match (``None`` attaches nothing). The model is returned in eval mode.
    """
    files = find_official_checkpoints(checkpoints, epoch) if isinstance(checkpoints, (str, Path)) else dict(checkpoints)
    if not files:
        raise ValueError("checkpoints: expected at least one model")
    states = {name: official_state_dict(path) for name, path in files.items()}
    widths = {name: s[_DICT].shape[1] for name, s in states.items()}
    latents = {name: s[_DICT].shape[0] for name, s in states.items()}
    if len(set(latents.values())) != 1:
        raise ValueError(f"official checkpoints disagree on the number of latents: {latents}")
    has_bn = {name: (_BN + "weight") in s for name, s in states.items()}
    if len(set(has_bn.values())) != 1:
        raise ValueError(f"official checkpoints mix encoders with and without BatchNorm: {has_bn}")
    m = next(iter(latents.values()))
    model = UniversalSAE(widths, m, k, "batchnorm" if next(iter(has_bn.values())) else "linear", init="official")
    tensors: dict[str, Tensor] = {}
    for i, (name, state) in enumerate(states.items()):
        expect = {_LINEAR + "weight": (m, widths[name]), _LINEAR + "bias": (m,)}
        for key, shape in expect.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{files[name]}: {key} has shape {tuple(state[key].shape)}; expected {shape}")
        tensors[f"coders.{i}.linear.weight"] = state[_LINEAR + "weight"]
        tensors[f"coders.{i}.linear.bias"] = state[_LINEAR + "bias"]
        tensors[f"coders.{i}.dictionary"] = state[_DICT]
        if model.encoder_kind == "batchnorm":
            for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if _BN + part not in state:
                    raise ValueError(f"{files[name]}: not a complete official USAE checkpoint: missing "
                                     f"{_BN + part!r} of its BatchNorm encoder; found {sorted(state)}")
                tensors[f"coders.{i}.bn.{part}"] = state[_BN + part]
    model.load_tensors({key: t.float() if t.is_floating_point() else t for key, t in tensors.items()})
    for name, stats in (standardisation or {}).items():
        if name in widths:
            model.set_standardisation(name, stats[0], stats[1])
    return model.eval()
