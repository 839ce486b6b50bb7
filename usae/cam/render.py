"""The render loop, CAM's settings and presets, and the coordinated and consensus modes.

:func:`render` optimises one parameterised image (or a batch of them) so that an objective is maximal. Each
step draws one set of random views (shared by every model the objective reads), resizes them to each
model's own input resolution and runs the model's backbone (which applies its own normalisation). It then
ascends the objective. It returns the image and MACO's transparency map, the accumulated
``|d loss / d image|`` (where the image mattered).

- :func:`coordinated` is the paper's CAM (Sec. 3.3): for one concept index ``k``, one image per model, each
  maximising ``Z_k`` through that model alone. The coordination is the shared concept index.
- :func:`consensus` goes beyond the paper: *one* image that maximises ``k`` in all models at once (the sum
  of the per-model objectives).

Presets (:func:`cam_settings`): ``"paper"`` is MACO's defaults as in Horama's ``maco``. That is a 1280 px
phase image, NAdam at lr 1.0, 1000 steps, 6 crops per step (centre ~ N(0.5, 0.15), side 0.20-0.30 of the
image) resized to the model's 224 px, noise std 0.05 plus uniform 0.05, and values in (-2.5, 2.5) of the
model's normalised input. ``"book"`` and ``"smoke"`` are the toy-world scale: a 64 px image (a toy model's
whole input), 2 noisy views per step and no crops, and 128 (smoke: 32) steps. A 256-step render through one toy
model then takes a few seconds on 2 CPU cores. Crops are left out at toy scale because the toy ViT and
Mixer cut their 64 px input into fixed 8 px patches: a crop rescaled to 64 px, or a shift by a fraction of
a patch, moves every patch boundary. Measured on the book preset's models, crops of 0.6-0.9 of the image
cost the ViT and the Mixer most of their activation (the CAM image then often scored below the concept's
best dataset images). The paper-scale crops (a 224 px view of a 1280 px canvas) do not have this problem.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from usae._checks import positive_int
from usae.cam.objectives import REDUCTIONS, Objective, concept, concept_head, l2, total_variation
from usae.cam.params import PARAMETERISATIONS, ImageParam, check_size, check_value_range, make_param
from usae.cam.spectrum import Spectrum
from usae.cam.transforms import Views, views_from

__all__ = ["CamSettings", "CAM_PRESETS", "cam_settings", "CamContext", "CamResult", "render", "coordinated",
           "consensus", "pixel_range"]

OPTIMISERS = {"adam": torch.optim.Adam, "nadam": torch.optim.NAdam, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class CamSettings:
    """Everything a render depends on besides the objective, the models and the seed.

    ``optimiser``/``lr``: ``None`` takes the parameterisation's own (MACO: NAdam, 1.0; pixel and Fourier:
    Adam, 0.05). ``value_space``: ``"pixel"`` means ``value_range`` is in [0, 1] pixel units; ``"model"``
    means it is in the model's normalised input units, converted with the zoo entry's mean/std (MACO's
    ``values_range``; for several models the ranges are intersected). ``grid``: resample token grids to
    this side before the objective (the store's common grid); ``None`` keeps each model's own grid.
    ``tv``/``l2``: weights of the regularisers, subtracted from the objective. ``threads``: torch threads of
    the render loop on CPU (None: torch's setting); the toy presets use 1, since 64-px views of toy models
    run faster on one thread than on two.
    """

    param: str = "maco"
    size: int = 64
    steps: int = 256
    optimiser: str | None = None
    lr: float | None = None
    n_views: int = 4
    crop_size: tuple[float, float] | None = None
    centre_std: float = 0.15
    jitter: float = 0.0
    scale: tuple[float, float] | None = None
    rotate: float = 0.0
    noise_std: float = 0.05
    noise_uniform: float = 0.05
    value_range: tuple[float, float] = (0.0, 1.0)
    value_space: str = "pixel"
    reduce: str = "mean"
    tv: float = 0.0
    l2: float = 0.0
    grid: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.param not in PARAMETERISATIONS:
            raise ValueError(f"param = {self.param!r} is not valid; expected one of {list(PARAMETERISATIONS)}")
        check_size(self.size)
        positive_int("steps", self.steps)
        if self.optimiser is not None and self.optimiser not in OPTIMISERS:
            raise ValueError(f"optimiser = {self.optimiser!r} is not valid; expected None or one of "
                             f"{list(OPTIMISERS)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr = {self.lr!r} is not valid; expected None or a positive float")
        if self.value_space not in ("pixel", "model"):
            raise ValueError(f"value_space = {self.value_space!r} is not valid; expected 'pixel' or 'model'")
        check_value_range(self.value_range)
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce = {self.reduce!r} is not valid; expected one of {list(REDUCTIONS)}")
        for label, value in (("grid", self.grid), ("threads", self.threads)):
            if value is not None:
                positive_int(label, value)
        self.views()  # validates the transform settings

    def replace(self, **changes: Any) -> CamSettings:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def views(self) -> Views:
        return views_from(self.n_views, self.crop_size, self.centre_std, self.jitter, self.scale, self.rotate,
                          self.noise_std, self.noise_uniform)

    def objective(self, names: Sequence[str], k: int) -> Objective:
        """Sum over ``names`` of concept ``k`` (this ``reduce``), minus the weighted regularisers."""
        obj = sum(concept(n, k, self.reduce) for n in names)
        if self.tv:
            obj = obj - self.tv * total_variation()
        if self.l2:
            obj = obj - self.l2 * l2()
        return obj


CAM_PRESETS: dict[str, CamSettings] = {
    "smoke": CamSettings(steps=32, n_views=2, crop_size=None, threads=1),
    "book": CamSettings(steps=128, n_views=2, crop_size=None, threads=1),
    "paper": CamSettings(param="maco", size=1280, steps=1000, optimiser="nadam", lr=1.0, n_views=6,
                         crop_size=(0.20, 0.30), centre_std=0.15, noise_std=0.05, noise_uniform=0.05,
                         value_range=(-2.5, 2.5), value_space="model"),
}


def cam_settings(preset: str = "book", **changes: Any) -> CamSettings:
    """The CAM settings of an experiment preset (``smoke``, ``book``, ``paper``) with fields replaced."""
    if preset not in CAM_PRESETS:
        raise ValueError(f"CAM preset {preset!r} is not valid; expected one of {list(CAM_PRESETS)}")
    return CAM_PRESETS[preset].replace(**changes) if changes else CAM_PRESETS[preset]


def pixel_range(settings: CamSettings, backbones: Sequence[Any]) -> Tensor:
    """``settings.value_range`` in pixel units ``[2, 3]`` (intersected over ``backbones`` in model space)."""
    vr = check_value_range(settings.value_range)
    if settings.value_space == "pixel":
        return vr
    lows, highs = [], []
    for bb in backbones:
        mean, std = torch.tensor(bb.entry.mean), torch.tensor(bb.entry.std)
        lows.append(mean + std * vr[0])
        highs.append(mean + std * vr[1])
    lo, hi = torch.stack(lows).amax(0), torch.stack(highs).amin(0)
    if not bool((lo < hi).all()):
        raise ValueError(f"value_range {settings.value_range} in model units has no common pixel range across "
                         f"the models {[bb.entry.name for bb in backbones]}")
    return torch.stack([lo, hi])


class CamContext:
    """What an objective sees in one step: ``images [B, 3, S, S]`` (pixel units) and, per model, its views'
    tokens. Tokens are computed on first request, so a model the objective does not read never runs."""

    def __init__(self, images: Tensor, theta: Tensor, views: Views, backbones: Mapping[str, Any], sae: Any,
                 heads: dict, gen: torch.Generator, grid: int | None = None) -> None:
        self.images, self.batch = images, images.shape[0]
        self._theta, self._views, self._backbones, self._sae = theta, views, backbones, sae
        self._heads, self._gen, self._grid = heads, gen, grid
        self._tokens: dict[str, Tensor] = {}

    def raw_tokens(self, name: str) -> Tensor:
        """Tokens of model ``name`` on this step's views, before standardisation: ``[B * n, h, w, D]``."""
        if name not in self._tokens:
            backbone = self._backbones[name]
            views = self._views.apply(self.images, self._theta, backbone.entry.image_size, self._gen)
            tokens = backbone(views)
            if self._grid is not None:
                from usae.data.extract import resample_grid

                tokens = resample_grid(tokens, self._grid)
            self._tokens[name] = tokens
        return self._tokens[name]

    def tokens(self, name: str) -> Tensor:
        """Standardised tokens (``UniversalSAE.standardise``): ``[B * n, h, w, D]``."""
        raw = self.raw_tokens(name)
        return self._sae.standardise(name, raw.reshape(-1, raw.shape[-1])).view(raw.shape)

    def concept_map(self, name: str, k: int) -> Tensor:
        """Pre-TopK activation of concept ``k`` on every token of every view: ``[B * n, h, w]``."""
        tokens = self.raw_tokens(name)
        if (name, k) not in self._heads:
            self._heads[(name, k)] = tuple(t.to(tokens.device, tokens.dtype) for t in concept_head(self._sae, name, k))
        weight, bias = self._heads[(name, k)]
        return tokens @ weight + bias


@dataclass
class CamResult:
    """``images [B, 3, S, S]`` in pixel units; ``alpha [B, S, S]``: accumulated mean-over-channels
    ``|d loss / d image|`` (MACO's transparency); ``history [steps, B]``: the objective at each step.
    ``seconds``: wall time of the loop; ``cpu_seconds``: CPU time this process spent in it (all threads),
    which a busy machine does not inflate."""

    images: Tensor
    alpha: Tensor
    history: Tensor
    description: str
    seconds: float
    cpu_seconds: float
    settings: CamSettings
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> Tensor:
        """The first image: [3, S, S]."""
        return self.images[0]


def _check_objective(objective: Objective, backbones: Mapping[str, Any], sae: Any) -> None:
    if not isinstance(objective, Objective):
        raise ValueError(f"objective of type {type(objective).__name__} is not valid; expected a usae.cam "
                         "Objective (e.g. concept(name, k))")
    for name in sorted(objective.models):
        if name not in backbones:
            raise ValueError(f"objective reads model {name!r}, which is not among the backbones {list(backbones)}")
        sae.index(name)
    for name, k in objective.concepts:
        concept_head(sae, name, k)  # ValueError for k >= m, missing standardisation, BN without statistics


def _device_of(backbones: Sequence[Any]) -> torch.device:
    """The device of the backbones' parameters (CPU when there are none); they must agree."""
    devices = {p.device for bb in backbones for p in list(bb.parameters())[:1]}
    if len(devices) > 1:
        raise ValueError(f"the objective's backbones live on different devices {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


def render(objective: Objective, backbones: Mapping[str, Any], sae: Any, settings: CamSettings | str = "book",
           seed: int = 0, batch: int = 1, param: ImageParam | None = None, spectrum: Spectrum | None = None,
           progress: bool = True) -> CamResult:
    """Maximise ``objective`` over an image; returns a :class:`CamResult`.

    ``settings``: a :class:`CamSettings` or a preset name. ``seed`` fixes the initial image and every random
    view (same seed, same machine: same image). ``batch``: images optimised at once (independent).
    ``param``: an explicit parameterisation (default: ``settings.param`` at ``settings.size``).
    """
    settings = cam_settings(settings) if isinstance(settings, str) else settings
    if not isinstance(settings, CamSettings):
        raise ValueError(f"settings = {settings!r} is not valid; expected CamSettings or a preset name")
    _check_objective(objective, backbones, sae)
    models = [backbones[n] for n in sorted(objective.models)]
    if param is None:
        param = make_param(settings.param, settings.size, batch, seed, pixel_range(settings, models), spectrum)
    elif not isinstance(param, ImageParam):
        raise ValueError(f"param of type {type(param).__name__} is not valid; expected an ImageParam")
    device = _device_of(models)
    param = param.to(device)
    optimiser = OPTIMISERS[settings.optimiser or param.optimiser](param.parameters(), lr=settings.lr or param.lr)
    views, gen = settings.views(), torch.Generator().manual_seed(2 * int(seed) + 1)
    size, b = param.size, param.batch
    alpha = torch.zeros(b, size, size, device=device)
    history = torch.zeros(settings.steps, b, device=device)
    heads: dict = {}
    sae_mode = sae.training
    sae.eval()
    threads = torch.get_num_threads()
    if settings.threads is not None and device.type == "cpu":
        torch.set_num_threads(settings.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        bar = tqdm(range(settings.steps), desc=f"CAM {objective.description}"[:60], disable=not progress)
        for step in bar:
            images = param()
            images.retain_grad()
            ctx = CamContext(images, views.sample(b, size, gen), views, backbones, sae, heads, gen, settings.grid)
            value = objective(ctx)
            optimiser.zero_grad(set_to_none=True)
            (-value.sum()).backward()
            alpha += images.grad.detach().abs().mean(1)
            optimiser.step()
            history[step] = value.detach()
            if progress and step % 16 == 0:
                bar.set_postfix(objective=f"{float(value.mean()):.3g}")
        with torch.no_grad():
            final = param().detach().clone()
    finally:
        sae.train(sae_mode)
        torch.set_num_threads(threads)
    return CamResult(final.cpu(), alpha.cpu(), history.cpu(), objective.description, time.perf_counter() - started,
                     time.process_time() - cpu_started, settings, int(seed),
                     {"param": param.describe(), "views": views.describe()})


def coordinated(backbones: Mapping[str, Any], sae: Any, k: int, settings: CamSettings | str = "book",
                names: Sequence[str] | None = None, seed: int = 0, progress: bool = True,
                spectrum: Spectrum | None = None) -> dict[str, CamResult]:
    """The paper's CAM: for concept ``k``, one image per model (default: every USAE model), each rendered
    through that model alone, all from the same seed."""
    names = list(sae.names if names is None else names)
    settings = cam_settings(settings) if isinstance(settings, str) else settings
    return {n: render(settings.objective([n], k), backbones, sae, settings, seed, spectrum=spectrum,
                      progress=progress) for n in names}


def consensus(backbones: Mapping[str, Any], sae: Any, k: int, settings: CamSettings | str = "book",
              names: Sequence[str] | None = None, seed: int = 0, progress: bool = True,
              spectrum: Spectrum | None = None) -> CamResult:
    """One image maximising concept ``k`` in every model of ``names`` at once (sum of the objectives)."""
    names = list(sae.names if names is None else names)
    if not names:
        raise ValueError("consensus needs at least one model name")
    settings = cam_settings(settings) if isinstance(settings, str) else settings
    return render(settings.objective(names, k), backbones, sae, settings, seed, spectrum=spectrum,
                  progress=progress)
