"""The toy model zoo: each toy backbone of ``usae.data.zoo`` trained on its own tasks over the toy world.

Every model shares one per-patch head per level of abstraction: a linear map of each output token names its
patch's colour (low), shape (mid), object and part (high); the ViT and the Mixer also name the background
texture, and the ConvNeXt alone names the background colour, from the mean and the max of the tokens
(:data:`TASKS`; :func:`task_design` states what this means for each factor). Every head reads the
*backbone's output tokens* (the ones ``usae.data.extract`` later reads), so those token features are exactly
the ones the tasks shaped. Per-patch heads make every token of a thing carry its factors; image-level heads
("which shapes are present") let the answer sit on a few tokens, and no USAE concept then detected a shape on
the patches. DESIGN.md §5 explains the task choice: a factor comes out universal only when every model's
task needs it.

Training uses split ``"zoo"``; metrics (with their chance levels) are measured on split ``"val"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from usae.data import zoo
from usae.config import BackboneSpec, ZooTrainConfig
from usae.data.toyworld import FACTORS, LEVELS, TRAIN_TEXTURES, ToyBatch


@dataclass(frozen=True)
class Task:
    """One head. ``kind``: ``"multilabel"`` (BCE over pooled tokens, scored by macro average precision),
    ``"class"`` (cross-entropy over pooled tokens, scored by accuracy) or ``"patch"`` (cross-entropy of a
    linear map of every token against its patch's label, patches labelled -1 ignored; scored by accuracy over
    labelled patches). ``label`` names a ``ToyBatch.image_labels`` entry, or ``"patch.<factor>"`` for a
    ``patch_labels`` entry. ``factors``: the per-patch factors of ``usae.data.toyworld.FACTORS`` it needs."""

    name: str
    label: str
    kind: str
    n_outputs: int
    factors: tuple[str, ...]


PATCH_COLOR = Task("patch_color", "patch.color", "patch", len(FACTORS["color"]), ("color",))
PATCH_SHAPE = Task("patch_shape", "patch.shape", "patch", len(FACTORS["shape"]), ("shape",))
PATCH_OBJECT = Task("patch_object", "patch.object", "patch", len(FACTORS["object"]), ("object",))
PATCH_PART = Task("patch_part", "patch.part", "patch", len(FACTORS["part"]), ("part",))
TEXTURE = Task("texture", "texture", "class", len(TRAIN_TEXTURES), ("texture",))
BACKGROUND = Task("bg_color", "bg_color", "class", len(FACTORS["bg_color"]), ("bg_color",))
# the tasks every model shares: name each patch's colour (low level), shape (mid) and object and part (high)
SHARED_TASKS = (PATCH_COLOR, PATCH_SHAPE, PATCH_OBJECT, PATCH_PART)
TASKS: dict[str, tuple[Task, ...]] = {
    "toy_vit": (*SHARED_TASKS, TEXTURE),
    "toy_convnext": (*SHARED_TASKS, BACKGROUND),
    "toy_mixer": (*SHARED_TASKS, TEXTURE),
}


@dataclass(frozen=True)
class FactorDesign:
    """What the zoo's tasks demand of one factor: its level, the models whose task needs it, and so what its
    universality should be by design (``"universal"``: every model, ``"pairwise"``: two, ``"unique"``: one,
    ``"none"``: no model)."""

    factor: str
    level: str
    models: tuple[str, ...]
    expected: str


def task_design(models: tuple[str, ...] = tuple(TASKS)) -> tuple[FactorDesign, ...]:
    """The design table of the zoo's tasks over ``models``: one row per factor, in level order."""
    for name in models:
        _tasks_of(name)
    rows = []
    for level, factors in LEVELS.items():
        for f in factors:
            need = tuple(m for m in models if any(f in t.factors for t in TASKS[m]))
            expected = ("universal" if len(need) == len(models) else "none" if not need else
                        "unique" if len(need) == 1 else "pairwise" if len(need) == 2 else "shared")
            rows.append(FactorDesign(f, level, need, expected))
    return tuple(rows)


_WARMUP_FRACTION = 0.05
_WEIGHT_DECAY = 0.05
_EVAL_BATCH = 250


POOLS = ("mean", "max", "meanmax")


class TaskHeads(nn.Module):
    """Linear heads: ``forward(tokens [B, h, w, D]) -> {task: logits}``, [B, n_outputs] for image tasks (over
    pooled tokens) and [B, h, w, n_outputs] for patch tasks (every token on its own).

    ``pool``: ``"mean"`` or ``"max"`` over tokens ([B, D]), or both concatenated (``"meanmax"``, [B, 2D]).
    """

    def __init__(self, dim: int, tasks: tuple[Task, ...], pool: str = "meanmax") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool = {pool!r} is not valid; expected one of {list(POOLS)}")
        self.tasks, self.pool = tasks, pool
        width = 2 * dim if pool == "meanmax" else dim
        self.heads = nn.ModuleDict({t.name: nn.Linear(dim if t.kind == "patch" else width, t.n_outputs)
                                    for t in tasks})

    def pooled(self, tokens: Tensor) -> Tensor:
        """tokens [B, h, w, D] -> [B, D] or [B, 2D]."""
        flat = tokens.flatten(1, 2)
        if self.pool == "mean":
            return flat.mean(1)
        if self.pool == "max":
            return flat.amax(1)
        return torch.cat([flat.mean(1), flat.amax(1)], dim=1)

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        pooled = self.pooled(tokens)
        return {t.name: self.heads[t.name](tokens if t.kind == "patch" else pooled) for t in self.tasks}


def _tasks_of(name: str) -> tuple[Task, ...]:
    if name not in TASKS:
        raise ValueError(f"toy model = {name!r} is not valid; expected one of {list(TASKS)}")
    return TASKS[name]


def _loss(logits: dict[str, Tensor], labels: dict[str, Tensor], tasks: tuple[Task, ...]) -> Tensor:
    total = logits[tasks[0].name].new_zeros(())
    for t in tasks:
        y = labels[t.label]
        if t.kind == "multilabel":
            total = total + F.binary_cross_entropy_with_logits(logits[t.name], y)
        elif t.kind == "patch":
            total = total + F.cross_entropy(logits[t.name].flatten(0, 2), y.flatten(), ignore_index=-1)
        else:
            total = total + F.cross_entropy(logits[t.name], y)
    return total


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-column average precision: scores, targets [N, C] -> [C] (NaN for a column with no positive)."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)[:, None]
    n_pos = hits.sum(0)
    return ((precision * hits).sum(0) / n_pos).where(n_pos > 0, torch.tensor(float("nan"), dtype=torch.float64))


def _score(task: Task, logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Held-out metric of one head and its chance level (what a constant predictor gets)."""
    if task.kind == "multilabel":
        ap = average_precision(logits, labels)
        pred = logits > 0
        tp = (pred & (labels > 0.5)).sum().item()
        f1 = 2 * tp / max(pred.sum().item() + (labels > 0.5).sum().item(), 1)
        prevalence = labels.mean(0).double()
        return {"value": float(np.nanmean(ap.numpy())), "metric": "mAP",
                "chance": float(prevalence.mean().item()), "f1": f1}
    if task.kind == "patch":
        logits, labels = logits.flatten(0, 2)[labels.flatten() >= 0], labels.flatten()[labels.flatten() >= 0]
    counts = torch.bincount(labels, minlength=task.n_outputs)
    return {"value": float((logits.argmax(1) == labels).float().mean().item()), "metric": "accuracy",
            "chance": float(counts.max().item() / max(len(labels), 1))}


def task_labels(batch: ToyBatch) -> dict[str, Tensor]:
    """Every label a task can name: the batch's image labels and its patch labels as ``"patch.<factor>"``."""
    return {**batch.image_labels, **{f"patch.{k}": v for k, v in batch.patch_labels.items()}}


@torch.no_grad()
def evaluate(backbone: nn.Module, heads: TaskHeads, images: Tensor, labels: dict[str, Tensor]) -> dict:
    """Held-out scores of every head: ``{task: {"value", "metric", "chance", ...}}``."""
    backbone.eval()
    heads.eval()
    device = next(heads.parameters()).device
    parts: dict[str, list[Tensor]] = {t.name: [] for t in heads.tasks}
    for lo in range(0, len(images), _EVAL_BATCH):
        out = heads(backbone(images[lo: lo + _EVAL_BATCH].to(device)))
        for k, v in out.items():
            parts[k].append(v.float().cpu())
    return {t.name: _score(t, torch.cat(parts[t.name]), labels[t.label]) for t in heads.tasks}


def _lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 5 % of steps, then cosine decay to zero."""
    warmup = max(1, int(_WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_one(name: str, images: Tensor, labels: dict[str, Tensor], cfg: ZooTrainConfig,
              progress: bool = True, device: str | torch.device = "cpu",
              pool: str = "meanmax", on_step: Callable[[int, int], None] | None = None,
              ) -> tuple[nn.Module, TaskHeads, float]:
    """Train toy backbone ``name`` and its heads on images [N, 3, H, W] with ``labels`` (:func:`task_labels`).

    ``on_step(steps done, steps)`` is called after every step (a zoo worker reports its progress with it).
    Returns (backbone in eval mode, heads, final training loss averaged over the last 10 % of steps), on
    ``device``.
    """
    tasks = _tasks_of(name)
    seed = cfg.seed * 1000 + list(TASKS).index(name)
    torch.manual_seed(seed)                                      # parameter init is seeded
    backbone = zoo.load_backbone(BackboneSpec(name, pretrained=False))
    backbone.model.requires_grad_(True)       # zoo.Backbone freezes its model; the toy models have no
    # dropout or batch norm, so the eval mode it keeps them in trains the same as train mode would
    heads = TaskHeads(backbone.dim, tasks, pool)
    backbone.to(device)
    heads.to(device)
    images = images.to(device)
    labels = {k: v.to(device) for k, v in labels.items()}
    params = list(backbone.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=_WEIGHT_DECAY)
    steps = cfg.steps_of(name)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    gen = torch.Generator().manual_seed(seed)
    backbone.train()
    heads.train()
    order, cursor, recent = torch.randperm(len(images), generator=gen), 0, []
    bar = tqdm(range(steps), desc=f"train {name}", disable=not progress, leave=False)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor: cursor + cfg.batch_size].to(device)
        cursor += cfg.batch_size
        loss = _loss(heads(backbone(images[idx])), {k: v[idx] for k, v in labels.items()}, tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-max(1, steps // 10):]
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
        if on_step is not None:
            on_step(step + 1, steps)
    backbone.eval()
    heads.eval()
    return backbone, heads, float(sum(recent) / len(recent))


def load_toy_backbone(name: str, out_dir: Path, layer: int | None = None) -> nn.Module:
    """The trained toy backbone ``name`` from ``out_dir`` as a ``zoo.Backbone`` (eval mode)."""
    _tasks_of(name)
    path = Path(out_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise ValueError(f"load_toy_backbone: no weights for {name!r} at {str(path)!r}; train the zoo first")
    return zoo.load_backbone(BackboneSpec(name, layer=layer, pretrained=False), weights=path).eval()


def load_toy_heads(name: str, out_dir: Path) -> TaskHeads:
    """The trained task heads of toy model ``name`` from ``out_dir``."""
    tasks = _tasks_of(name)
    path = Path(out_dir) / f"{name}.heads.safetensors"
    if not path.is_file():
        raise ValueError(f"load_toy_heads: no heads for {name!r} at {str(path)!r}; train the zoo first")
    with safe_open(str(path), "pt") as f:
        pool = (f.metadata() or {}).get("pool", "meanmax")
    state = load_file(str(path))
    pooled = [t for t in tasks if t.kind != "patch"]
    width = state[f"heads.{(pooled or tasks)[0].name}.weight"].shape[1]
    heads = TaskHeads(width // 2 if pool == "meanmax" and pooled else width, tasks, pool)
    heads.load_state_dict(state)
    return heads.eval()


def flat_scores(report: dict) -> tuple[dict[str, float], dict[str, float]]:
    """``("model: task" -> held-out score, "model: task" -> chance)`` from a ``usae.data.toyzoo_build.train_toy_zoo`` report."""
    scores, chance = {}, {}
    for name, entry in report.items():
        for task in entry["metric"]:
            scores[f"{name}: {task}"] = float(entry[task])
            chance[f"{name}: {task}"] = float(entry["chance"][task])
    return scores, chance
