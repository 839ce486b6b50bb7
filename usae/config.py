"""Frozen, validated configuration dataclasses, the ``smoke``/``book``/``paper`` presets, a stable hash, and
where things live (``repo_root``, the artifact cache ``runs_dir``).

Every artifact the book computes is keyed by the hash of the configuration it depends on, so a config is
plain data: strings, numbers, booleans, ``None`` and tuples of those (or of nested configs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from usae._checks import is_int, nonneg_int, nonneg_number, positive_int, positive_number

PRESETS = ("smoke", "book", "paper")


def repo_root(start: Path | None = None) -> Path:
    """The folder holding ``_config.yml`` and ``usae/``, found by walking up from ``start`` (default: cwd).

    Jupyter Book and nbval run a chapter's kernel in ``book/``, papermill in the invocation folder; both
    find the same root. Falls back to the folder this package was imported from.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_config.yml").is_file() and (folder / "usae").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


def runs_dir(create: bool = True) -> Path:
    """The artifact cache: ``$USAE_RUNS`` when set, else ``<repo>/data/runs`` (created unless ``create=False``)."""
    override = os.environ.get("USAE_RUNS")
    path = Path(override).expanduser() if override else repo_root() / "data" / "runs"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{owner}.{name} = {value!r} is not valid; {allowed}")


def _positive_int(owner: str, name: str, value: Any) -> None:
    positive_int(f"{owner}.{name}", value)


def _nonneg_int(owner: str, name: str, value: Any) -> None:
    nonneg_int(f"{owner}.{name}", value)


def _positive_float(owner: str, name: str, value: Any) -> None:
    positive_number(f"{owner}.{name}", value)


def _nonneg_float(owner: str, name: str, value: Any) -> None:
    nonneg_number(f"{owner}.{name}", value)


def _choice(owner: str, name: str, value: Any, options: Iterable[Any]) -> None:
    options = tuple(options)
    if value not in options:
        _fail(owner, name, value, f"expected one of {list(options)}")


class _Config:
    """Mixin: ``to_dict``, ``from_dict``, ``replace`` and a stable content ``hash``."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def hash(self, length: int = 10) -> str:
        """Hex digest of the canonical JSON of this config (same content -> same hash, across runs)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:length]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Inverse of ``to_dict``; unknown keys are an error naming the key and the valid ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        data = {_RENAMED.get((cls.__name__, k), k): v for k, v in data.items()}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
        kwargs = {}
        for name, value in data.items():
            sub = _NESTED.get((cls.__name__, name))
            if sub is not None and isinstance(value, Mapping):
                value = sub.from_dict(value)
            elif sub is not None and isinstance(value, (list, tuple)):
                value = tuple(sub.from_dict(v) if isinstance(v, Mapping) else sub.coerce(v) for v in value)
            elif isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kwargs[name] = value
        return cls(**kwargs)


# fields renamed since files were first written: (class, old name) -> new name, read from old JSON configs
_RENAMED = {("ExtractConfig", "standardize"): "standardise"}


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyWorldConfig(_Config):
    """The procedural world: image side in pixels, common token grid side, objects per image, seed."""

    image_size: int = 64
    grid: int = 8
    min_objects: int = 1
    max_objects: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        o = "ToyWorldConfig"
        _positive_int(o, "image_size", self.image_size)
        _positive_int(o, "grid", self.grid)
        if self.image_size % self.grid:
            _fail(o, "grid", self.grid, f"expected a divisor of image_size={self.image_size}")
        _positive_int(o, "min_objects", self.min_objects)
        _positive_int(o, "max_objects", self.max_objects)
        if self.max_objects < self.min_objects:
            _fail(o, "max_objects", self.max_objects, f"expected >= min_objects={self.min_objects}")
        _nonneg_int(o, "seed", self.seed)


@dataclass(frozen=True)
class ZooTrainConfig(_Config):
    """Training of the toy model zoo: which toy models, how many images and optimisation steps.

    ``step_scale``: ``((model, factor), ...)``; that model trains ``round(steps * factor)`` steps (at least 1).
    The ConvNeXt learns the per-patch tasks in half the steps the Mixer needs and the ViT needs half as many
    again, so the default gives them 0.5 and 1.5 times ``steps``.
    """

    models: tuple[str, ...] = ("toy_vit", "toy_convnext", "toy_mixer")
    n_train_images: int = 6000
    n_val_images: int = 1000
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    step_scale: tuple[tuple[str, float], ...] = (("toy_vit", 1.5), ("toy_convnext", 0.5))

    def steps_of(self, model: str) -> int:
        """Optimisation steps of toy model ``model``."""
        return max(1, round(self.steps * dict(self.step_scale).get(model, 1.0)))

    def __post_init__(self) -> None:
        o = "ZooTrainConfig"
        if not isinstance(self.models, tuple) or not self.models or len(set(self.models)) != len(self.models):
            _fail(o, "models", self.models, "expected a non-empty tuple of distinct toy model names")
        for name in ("n_train_images", "n_val_images", "steps", "batch_size"):
            _positive_int(o, name, getattr(self, name))
        _positive_float(o, "lr", self.lr)
        _nonneg_int(o, "seed", self.seed)
        if not isinstance(self.step_scale, tuple) or not all(
                isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in self.step_scale):
            _fail(o, "step_scale", self.step_scale, "expected ((model name, positive factor), ...)")
        for name, factor in self.step_scale:
            _positive_float(o, f"step_scale[{name!r}]", factor)


@dataclass(frozen=True)
class BackboneSpec(_Config):
    """One backbone of the experiment: a ``usae.data.zoo`` name, the block to read and whether to load weights.

    ``layer=None`` reads the final block output after the final norm (the paper's setting); an int reads the
    output of that block (negative indices count from the end).
    """

    name: str
    layer: int | None = None
    pretrained: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _fail("BackboneSpec", "name", self.name, "expected a non-empty model name from usae.data.zoo")
        if self.layer is not None and not is_int(self.layer):
            _fail("BackboneSpec", "layer", self.layer, "expected None (final layer) or a block index")
        if not isinstance(self.pretrained, bool):
            _fail("BackboneSpec", "pretrained", self.pretrained, "expected True or False")

    @classmethod
    def coerce(cls, value: str | BackboneSpec | Mapping[str, Any]) -> BackboneSpec:
        if isinstance(value, BackboneSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise ValueError(f"BackboneSpec: cannot make a backbone from {value!r}; give a name or a mapping")


@dataclass(frozen=True)
class ExtractConfig(_Config):
    """Extraction into the activation store.

    ``standardise``: ``"scalar"`` (the paper: one mean and std per model), ``"channel"`` or ``"none"``;
    the statistics come from the first ``n_stats_images`` training images.
    """

    n_train_images: int = 3000
    n_val_images: int = 500
    grid: int = 8
    dtype: str = "float16"
    standardise: str = "scalar"
    n_stats_images: int = 1000
    batch_size: int = 64
    image_size: int = 64

    def __post_init__(self) -> None:
        o = "ExtractConfig"
        for name in ("n_train_images", "n_val_images", "grid", "n_stats_images", "batch_size", "image_size"):
            _positive_int(o, name, getattr(self, name))
        _choice(o, "dtype", self.dtype, ("float16", "float32"))
        _choice(o, "standardise", self.standardise, ("scalar", "channel", "none"))


@dataclass(frozen=True)
class USAEConfig(_Config):
    """Shape of the universal SAE: code width (``None``: ``expansion`` x the widest model), TopK, encoder and
    the initial decoder rows (``init``: ``"tied"`` to the encoder, ``"unit"`` or the authors' ``"official"`` randn)."""

    n_latents: int | None = None
    expansion: int = 8
    k: int = 32
    encoder: str = "batchnorm"
    init: str = "tied"

    def __post_init__(self) -> None:
        o = "USAEConfig"
        if self.n_latents is not None:
            _positive_int(o, "n_latents", self.n_latents)
            if self.k > self.n_latents:
                _fail(o, "k", self.k, f"expected k <= n_latents={self.n_latents}")
        _positive_int(o, "expansion", self.expansion)
        _positive_int(o, "k", self.k)
        _choice(o, "encoder", self.encoder, ("batchnorm", "linear"))
        _choice(o, "init", self.init, ("tied", "unit", "official"))

    def width(self, dims: Mapping[str, int]) -> int:
        """The code width m for models of these widths."""
        m = self.n_latents if self.n_latents is not None else self.expansion * max(dims.values())
        if self.k > m:
            _fail("USAEConfig", "k", self.k, f"expected k <= n_latents={m}")
        return m


@dataclass(frozen=True)
class TrainConfig(_Config):
    """The USAE trainer (defaults follow the paper and its official code; see the discrepancies appendix).

    ``batch_size`` counts tokens (rows); ``update``: ``"paper"`` steps only the selected model's encoder and
    decoder, ``"joint"`` the selected encoder and all decoders; ``schedule``: ``"global"`` drives warmup +
    cosine by the global step, ``"per_model"`` reproduces the official code (each scheduler stepped only when
    its model is picked).
    """

    steps: int = 1000
    batch_size: int = 6272
    lr: float = 3e-4
    final_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    loss: str = "l1"
    aux: str = "official"
    aux_coef: float = 0.1
    auxk_k: int = 512
    dead_after_tokens: int = 10_000_000
    update: str = "paper"
    schedule: str = "global"
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 25

    def __post_init__(self) -> None:
        o = "TrainConfig"
        for name in ("steps", "batch_size", "auxk_k", "dead_after_tokens", "log_every"):
            _positive_int(o, name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            _nonneg_int(o, name, getattr(self, name))
        _positive_float(o, "lr", self.lr)
        _positive_float(o, "final_lr", self.final_lr)
        _nonneg_float(o, "weight_decay", self.weight_decay)
        _nonneg_float(o, "grad_clip", self.grad_clip)
        _nonneg_float(o, "aux_coef", self.aux_coef)
        _choice(o, "loss", self.loss, ("l1", "l2"))
        _choice(o, "aux", self.aux, ("official", "auxk", "none"))
        _choice(o, "update", self.update, ("paper", "joint"))
        _choice(o, "schedule", self.schedule, ("global", "per_model"))

    def weights_dict(self) -> dict[str, Any]:
        """The fields that decide the trained weights: ``to_dict()`` without ``checkpoint_every``/``log_every``
        (an uninterrupted run and a resumed one end bit-identical whatever those are)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("checkpoint_every", "log_every")}


@dataclass(frozen=True)
class ExperimentConfig(_Config):
    """Everything one run of the book depends on.

    ``source`` is ``"toy"`` (the embedded world; backbones are the toy zoo, trained on first use) or the
    path of an image folder (backbones are real ``usae.data.zoo`` models).
    """

    name: str = "book"
    source: str = "toy"
    backbones: tuple[BackboneSpec, ...] = ()
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    zoo: ZooTrainConfig = field(default_factory=ZooTrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    usae: USAEConfig = field(default_factory=USAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        o = "ExperimentConfig"
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            _fail(o, "name", self.name, "expected a non-empty name without '/'")
        if not isinstance(self.source, str) or not self.source:
            _fail(o, "source", self.source, "expected 'toy' or the path of an image folder")
        specs = tuple(BackboneSpec.coerce(b) for b in self.backbones)
        if not specs and self.source == "toy":
            specs = tuple(BackboneSpec(n, pretrained=False) for n in self.zoo.models)
        if not specs:
            _fail(o, "backbones", self.backbones, "expected at least one backbone for an image folder")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            _fail(o, "backbones", names, "expected distinct backbone names")
        object.__setattr__(self, "backbones", specs)
        if self.source == "toy":
            missing = [n for n in names if n not in self.zoo.models]
            if missing:
                _fail(o, "backbones", names, f"the toy world's backbones come from zoo.models={list(self.zoo.models)}")
            if self.extract.grid != self.toy.grid or self.extract.image_size != self.toy.image_size:
                _fail(o, "extract", (self.extract.grid, self.extract.image_size),
                      f"toy world needs extract.grid={self.toy.grid}, extract.image_size={self.toy.image_size}")
        _choice(o, "device", self.device, ("cpu", "cuda", "auto"))

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backbones)


_NESTED: dict[tuple[str, str], Any] = {
    ("ExperimentConfig", "backbones"): BackboneSpec,
    ("ExperimentConfig", "toy"): ToyWorldConfig,
    ("ExperimentConfig", "zoo"): ZooTrainConfig,
    ("ExperimentConfig", "extract"): ExtractConfig,
    ("ExperimentConfig", "usae"): USAEConfig,
    ("ExperimentConfig", "train"): TrainConfig,
}


# ----------------------------------------------------------------------------------------------------------
PAPER_BACKBONES = ("dinov2_vits14", "siglip_vitb16", "vit_b16")


SEED_ENV = "USAE_SEED"


def with_seed(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """``config`` with every random choice of the pipeline drawn from ``seed``: the toy world's images, the toy
    zoo's initialisation and batch order, the USAE's initialisation and model picks (the independent SAEs use
    ``seed + 1``). Each stage's artifact hash covers its seed, so seeds never share a trained artifact."""
    _nonneg_int("with_seed", "seed", seed)
    return config.replace(toy=config.toy.replace(seed=seed), zoo=config.zoo.replace(seed=seed),
                          train=config.train.replace(seed=seed))


def seed_from_env(default: int = 0) -> int:
    """The pipeline seed from ``$USAE_SEED`` (``default`` when unset); ValueError naming the variable otherwise."""
    import os

    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ValueError(f"{SEED_ENV} = {raw!r} is not valid; expected an integer >= 0")
    return int(raw)


def preset(name: str, **overrides: Any) -> ExperimentConfig:
    """The named preset, with top-level fields replaced by ``overrides``.

    ``smoke``: seconds, for tests. ``book``: the default, minutes on 2 CPU cores. ``paper``: the paper's
    setting (three pretrained backbones, ImageNet, a GPU); ``source`` must then name the image folder.
    ``smoke`` and ``book`` train for 10^2-10^3 steps instead of ~10^6 and so use a larger learning rate.
    """
    if name not in PRESETS:
        raise ValueError(f"preset = {name!r} is not valid; expected one of {list(PRESETS)}")
    if name == "smoke":
        cfg = ExperimentConfig(
            name="smoke",
            zoo=ZooTrainConfig(n_train_images=512, n_val_images=128, steps=40, batch_size=32),
            extract=ExtractConfig(n_train_images=96, n_val_images=32, n_stats_images=64, batch_size=32),
            usae=USAEConfig(n_latents=256, k=8),
            train=TrainConfig(steps=300, batch_size=512, lr=3e-2, warmup_steps=20, log_every=20),
        )
    elif name == "book":
        cfg = ExperimentConfig(
            name="book",
            usae=USAEConfig(n_latents=1024, k=16),
            # 1500 steps instead of the paper's 1.2 M, so a larger lr than its 3e-4: with the tied init, 3e-3 is
            # the smallest lr we measured whose validation R² comes within 0.02 of the best (1e-2, seed 0;
            # 1e-3 falls 0.07 short on the diagonal)
            train=TrainConfig(steps=1500, batch_size=1024, lr=3e-3, warmup_steps=100, checkpoint_every=500),
        )
    else:
        cfg = ExperimentConfig(
            name="paper",
            source="imagenet",
            backbones=tuple(BackboneSpec(n) for n in PAPER_BACKBONES),
            extract=ExtractConfig(n_train_images=1_281_167, n_val_images=50_000, grid=14, dtype="float16",
                                  n_stats_images=1000, batch_size=128, image_size=224),
            usae=USAEConfig(n_latents=None, expansion=8, k=32),
            train=TrainConfig(steps=1_201_094, batch_size=6272, warmup_steps=40_036, checkpoint_every=10_000,
                              log_every=100),
            device="auto",
        )
    return cfg.replace(**overrides) if overrides else cfg
