"""The backbone zoo: any timm model by id, named shortcuts for the paper's models, and the embedded toy models.

A backbone name is a ``REGISTRY`` shortcut (``"dinov2_vits14"``, ``"toy_vit"``, ...) or any timm model id,
with or without its pretrained tag (``"vit_small_patch16_224.augreg_in21k"``, ``"resnet50"``): for an id,
the preprocessing (input size, mean, std), the prefix-token count (CLS, registers) and the token grid are read
from timm's own metadata (``pretrained_cfg``, ``num_prefix_tokens``, ``feature_info``) by :func:`timm_entry`.
``list_layers(name)`` lists the layers one can read (``BackboneSpec(name, layer=i)``).

A :class:`ZooEntry` says how to build a model, how to preprocess its input and what its token grid is;
:class:`Backbone` wraps a built model so that ``backbone(images)`` maps images in [0, 1] to patch tokens
``[B, h, w, D]`` at a chosen layer, with prefix tokens (CLS, registers) dropped.

Layers. ``layer=None`` (the paper's setting) is the final block output *after* the final norm: a ViT's or
Mixer's ``forward_features`` without prefix tokens; a CNN's final feature map (``forward_features``; ConvNeXt
and ResNet apply their head norm only after pooling, so the map is un-normalised). An int selects one of
timm's ``forward_intermediates`` feature points, *without* the final norm: a block for ViTs and Mixers
(``layer=-1`` is the last block's output before the final norm), a stage for ConvNeXt (its stages), and for
ResNet one of [stem, layer1, ..., layer4]. Negative indices count from the end.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usae.config import BackboneSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ZooEntry:
    """How to build and feed one backbone.

    ``arch``: a timm model name (real entries, built with ``timm.create_model``) or, for toy entries, the
    name of the timm model class built directly with ``kwargs``. ``pretrained_tag``: the timm weight tag
    (``arch.tag`` is the full timm id). ``kwargs``: extra constructor arguments as ``((key, value), ...)``.
    ``n_prefix``: leading tokens to drop (CLS, registers). ``grid``: native token-grid side at ``image_size``
    for the default layer; ``dim``: channels there.
    """

    name: str
    arch: str
    pretrained_tag: str | None
    kwargs: tuple[tuple[str, Any], ...]
    family: str
    n_prefix: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    grid: int
    toy: bool = False

    @property
    def timm_id(self) -> str:
        """The full timm model id, ``arch.tag`` (or ``arch`` alone when untagged)."""
        return f"{self.arch}.{self.pretrained_tag}" if self.pretrained_tag else self.arch


def _entry(name: str, arch: str, tag: str | None, family: str, n_prefix: int, image_size: int,
           mean: tuple, std: tuple, dim: int, grid: int, toy: bool = False, **kwargs: Any) -> ZooEntry:
    return ZooEntry(name, arch, tag, tuple(sorted(kwargs.items())), family, n_prefix, image_size,
                    mean, std, dim, grid, toy)


REGISTRY: dict[str, ZooEntry] = {e.name: e for e in (
    # The paper's three backbones. DINOv2 is built at 224 px: a 16x16 grid of 14-px patches; timm
    # resamples its 37x37 position embedding when loading the weights (torch.hub resamples at run time).
    _entry("dinov2_vits14", "vit_small_patch14_dinov2", "lvd142m", "vit", 1, 224, IMAGENET_MEAN, IMAGENET_STD,
           384, 16, img_size=224),
    _entry("siglip_vitb16", "vit_base_patch16_siglip_224", "webli", "vit", 0, 224, HALF, HALF, 768, 14),
    _entry("vit_b16", "vit_base_patch16_224", "augreg2_in21k_ft_in1k", "vit", 1, 224, HALF, HALF, 768, 14),
    # Beyond the paper.
    _entry("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", "lvd142m", "vit", 5, 224, IMAGENET_MEAN,
           IMAGENET_STD, 384, 16, img_size=224),
    _entry("clip_vitb16", "vit_base_patch16_clip_224", "openai", "vit", 1, 224, CLIP_MEAN, CLIP_STD, 768, 14),
    _entry("convnext_tiny", "convnext_tiny", "in12k_ft_in1k", "cnn", 0, 224, IMAGENET_MEAN, IMAGENET_STD,
           768, 7),
    _entry("resnet50", "resnet50", "a1_in1k", "cnn", 0, 224, IMAGENET_MEAN, IMAGENET_STD, 2048, 7),
    # The embedded toy zoo: 64x64 inputs, an 8x8 token grid, ~0.4-0.7 M parameters, random init (trained by
    # usae.data.toyzoo). timm's ConvNeXt always has 4 stages: a 1-px stem and stage strides 1,2,2,2 give 64 -> 8;
    # stage 0 (64x64, the costliest on CPU) has no blocks.
    # The ViT is wide and shallow: at equal training time a 3-block, 128-wide ViT learned the per-patch shape
    # task far better than a 6-block, 96-wide one (held-out accuracy 0.76 vs 0.52, one seed).
    _entry("toy_vit", "VisionTransformer", None, "vit", 1, 64, HALF, HALF, 128, 8, toy=True,
           img_size=64, patch_size=8, embed_dim=128, depth=3, num_heads=4, mlp_ratio=4.0),
    _entry("toy_convnext", "ConvNeXt", None, "cnn", 0, 64, HALF, HALF, 128, 8, toy=True,
           patch_size=1, depths=(0, 1, 2, 2), dims=(16, 32, 64, 128), kernel_sizes=(3, 5, 7, 7)),
    _entry("toy_mixer", "MlpMixer", None, "mixer", 0, 64, HALF, HALF, 112, 8, toy=True,
           img_size=64, patch_size=8, num_blocks=6, embed_dim=112, mlp_ratio=(0.5, 4.0)),
)}


def get_entry(name: str) -> ZooEntry:
    """The registry entry called ``name``, else the entry of the timm model id ``name`` (:func:`timm_entry`);
    ValueError naming both kinds of valid names otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    return timm_entry(name)


@lru_cache(maxsize=None)
def timm_entry(model_id: str) -> ZooEntry:
    """The entry of any timm model id (``"arch"`` or ``"arch.tag"``), from timm's metadata: input size, mean and
    std (``pretrained_cfg``), prefix tokens (``num_prefix_tokens``), channels (``num_features``) and the final
    grid (the last ``feature_info`` reduction). Builds the model once with random weights to read them."""
    import timm

    arch, _, tag = str(model_id).partition(".")
    if not model_id or not timm.is_model(arch):
        raise ValueError(f"unknown backbone {model_id!r}: neither a usae.data.zoo shortcut {sorted(REGISTRY)} nor a "
                         "timm model id; list ids with timm.list_models('vit_*', pretrained=True)")
    try:
        model = timm.create_model(model_id, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # e.g. an unknown pretrained tag
        raise ValueError(f"backbone {model_id!r}: timm cannot build it ({str(exc)[:200]})") from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    n_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info:
        grid = -(-size // int(info[-1]["reduction"]))
    else:  # no metadata: measure the grid with one forward pass
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 3, size, size))
        grid = out.shape[1] if out.dim() == 4 and _channels_last(model) else (
            out.shape[-1] if out.dim() == 4 else int(round((out.shape[1] - n_prefix) ** 0.5)))
    family = "vit" if hasattr(model, "num_prefix_tokens") else ("mixer" if "mixer" in arch else "cnn")
    return ZooEntry(str(model_id), arch, tag or None, (), family, n_prefix, size, mean, std,
                    int(model.num_features), int(grid))


def _channels_last(model: nn.Module) -> bool:
    """Whether the model's feature maps are [B, h, w, C] (timm's ``output_fmt``, e.g. Swin) rather than NCHW."""
    return str(getattr(model, "output_fmt", "NCHW")) == "NHWC"


@dataclass(frozen=True)
class LayerInfo:
    """One readable layer: ``BackboneSpec(name, layer=index)``; ``module`` is timm's name for it, ``dim`` its
    channels and ``grid`` its token-grid side at the backbone's input size."""

    index: int
    module: str
    dim: int
    grid: int


def list_layers(name: str) -> list[LayerInfo]:
    """The layers of backbone ``name`` that ``BackboneSpec(name, layer=i)`` can read (timm's feature points;
    ``layer=None`` is the final output after the final norm). Builds the model with random weights."""
    entry = get_entry(name)
    points = _feature_points(create_model(name, pretrained=False))
    return [LayerInfo(i, str(p.get("module", "")), int(p["num_chs"]), -(-entry.image_size // int(p["reduction"])))
            for i, p in enumerate(points)]


# ------------------------------------------------------------------------------------------------ building
def _toy_class(arch: str) -> type[nn.Module]:
    from timm.models.convnext import ConvNeXt
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.vision_transformer import VisionTransformer

    return {"VisionTransformer": VisionTransformer, "ConvNeXt": ConvNeXt, "MlpMixer": MlpMixer}[arch]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub endpoint accepts a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok = [False]

    def probe() -> None:  # DNS has no timeout of its own, so run the whole probe in a thread
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return ok[0]


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Make huggingface_hub answer from its local cache only (no retries against an unreachable Hub)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def create_model(name: str, pretrained: bool) -> nn.Module:
    """Build the timm model of zoo entry ``name`` (features only, ``num_classes=0``), in eval mode.

    ``pretrained=True`` loads the published weights from the Hugging Face Hub or its local cache; when they
    can be neither downloaded nor found in the cache this fails within seconds with a RuntimeError saying
    how to fix it. Toy entries have no published weights (train them with ``usae.data.toyzoo``).
    """
    import timm

    entry = get_entry(name)
    kwargs = dict(entry.kwargs)
    if entry.toy:
        if pretrained:
            raise ValueError(f"toy backbone {name!r} has no published weights; use pretrained=False and load "
                             "trained weights with load_backbone(spec, weights=...) or usae.data.toyzoo")
        model = _toy_class(entry.arch)(num_classes=0, **kwargs)
    elif not pretrained:
        model = timm.create_model(entry.timm_id, pretrained=False, num_classes=0, **kwargs)
    else:
        try:
            with _hub_offline(not _hub_reachable()):
                model = timm.create_model(entry.timm_id, pretrained=True, num_classes=0, **kwargs)
        except Exception as exc:  # huggingface_hub / timm raise many types; report one clear error
            raise RuntimeError(
                f"could not load pretrained weights for backbone {name!r} (timm id {entry.timm_id!r}): they could "
                "not be downloaded from the Hugging Face Hub and are not in the local HF cache "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}). Fixes: random weights with "
                f"BackboneSpec({name!r}, pretrained=False) (command line: --set 'backbones=[{{\"name\": "
                f"\"{name}\", \"pretrained\": false}}]'), weights=<file.safetensors> for load_backbone, or copy "
                "a Hugging Face cache filled on a machine with internet access (python -c \"import timm; "
                f"timm.create_model('{entry.timm_id}', pretrained=True)\") to ~/.cache/huggingface or $HF_HOME."
            ) from exc
    return model.eval()


# ------------------------------------------------------------------------------------------------ backbone
def _feature_points(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info:
        raise ValueError(f"{type(model).__name__} exposes no feature_info; only layer=None is supported")
    return info


class Backbone(nn.Module):
    """A zoo model as a map from images in [0, 1] to patch tokens ``[B, h, w, D]`` at one layer.

    Always in eval mode with frozen parameters. ``dim`` and ``grid`` describe the chosen layer at
    ``entry.image_size``.
    """

    def __init__(self, entry: ZooEntry, model: nn.Module, layer: int | None = None) -> None:
        super().__init__()
        self.entry = entry
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(entry.mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(entry.std, dtype=torch.float32).view(1, 3, 1, 1), False)
        if layer is None:
            self.layer, self.dim, self.grid = None, entry.dim, entry.grid
        else:
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise ValueError(f"layer = {layer!r} is not valid; expected None or an int")
            points = _feature_points(self.model)
            if not -len(points) <= layer < len(points):
                raise ValueError(f"layer = {layer} is out of range for {entry.name!r}: valid layers are "
                                 f"{-len(points)}..{len(points) - 1} (or None for the final output)")
            self.layer = layer % len(points)
            self.dim = int(points[self.layer]["num_chs"])
            reduction = int(points[self.layer]["reduction"])
            self.grid = -(-entry.image_size // reduction)

    def train(self, mode: bool = True) -> "Backbone":
        """The wrapped model stays in eval mode (dropout off, norm statistics frozen)."""
        super().train(mode)
        self.model.eval()
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` in [0, 1] -> normalised ``[B, 3, S, S]`` (bicubic + antialias squash)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images of shape {tuple(images.shape)} are not valid; expected [B, 3, H, W]")
        if not images.is_floating_point():
            raise ValueError(f"images of dtype {images.dtype} are not valid; expected floats in [0, 1]")
        size = self.entry.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True,
                                   align_corners=False).clamp_(0.0, 1.0)
        return (images.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` in [0, 1] -> tokens ``[B, h, w, D]`` (prefix tokens dropped)."""
        x = self.preprocess(images)
        if self.layer is None:
            out = self.model.forward_features(x)
            if out.dim() == 4:  # a feature map: [B, D, h, w], or [B, h, w, D] for channels-last models (Swin)
                return out if _channels_last(self.model) else out.permute(0, 2, 3, 1)
            tokens = out[:, self.entry.n_prefix:]
        else:
            out = self.model.forward_intermediates(x, indices=[self.layer], stop_early=True,
                                                   intermediates_only=True)[0]
            return out.permute(0, 2, 3, 1)  # timm returns NCHW with prefix tokens removed
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"{self.entry.name}: {tokens.shape[1]} tokens after dropping {self.entry.n_prefix} "
                             "prefix tokens do not form a square grid")
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2])


def load_backbone(spec: BackboneSpec, weights: str | Path | None = None) -> Backbone:
    """Build ``spec``'s backbone. ``weights``: a safetensors file of the timm model's state_dict (e.g. a
    trained toy model); when given, ``spec.pretrained`` is ignored and no download is attempted."""
    spec = BackboneSpec.coerce(spec)
    entry = get_entry(spec.name)
    if weights is None:
        return Backbone(entry, create_model(spec.name, spec.pretrained), spec.layer)
    from safetensors.torch import load_file

    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"weights = {str(path)!r} is not a file; expected a .safetensors state_dict")
    model = create_model(spec.name, pretrained=False)
    state = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"weights {str(path)!r} do not fit {spec.name!r}: {str(exc)[:400]}") from None
    if missing or unexpected:
        raise ValueError(f"weights {str(path)!r} do not fit {spec.name!r}: missing keys {list(missing)[:8]}, "
                         f"unexpected keys {list(unexpected)[:8]}")
    return Backbone(entry, model.eval(), spec.layer)
