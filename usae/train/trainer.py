"""The USAE trainer: the paper's update rule, its variants, monitoring, checkpoints and resume.

Each step picks one model i uniformly at random (seeded ``torch.Generator``), encodes its batch, decodes the
code into **every** model, sums the per-target losses and backpropagates. ``update="paper"`` then steps only
model i's encoder and decoder with model i's own AdamW (the other decoders are used without gradient, which
changes no update of the official code and skips wasted work); ``update="joint"`` steps model i's encoder and
all decoders. Gradients are clipped per model. The learning rate follows linear warmup (from ``final_lr``)
then cosine to ``final_lr``, driven by the global step (``schedule="global"``) or, as the official code, by
the number of times each model has been picked (``schedule="per_model"``; it never finishes its cosine).

Sources: an ``ActivationStore``-like object (``.batches(split, batch_size, shuffle, seed)``, a new seed per
epoch), a dict ``{name: [N, d]}`` of aligned rows (shuffled per epoch), or any iterable of batch dicts
(re-iterated when it ends; a one-shot iterator must last ``steps`` batches).

Checkpoints (``checkpoint_dir``, every ``checkpoint_every`` steps and at the end; ``usae.train.checkpoint``):
``fit`` resumes from the latest one when its configs match (resume skips the batches already consumed, so it
reproduces the uninterrupted run bit for bit). ``fit`` returns a :class:`usae.train.history.TrainHistory`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version
from tqdm.auto import tqdm

from usae._checks import positive_int
from usae.config import TrainConfig
from usae.core.losses import auxk_aux, auxk_dense, official_aux, reconstruction_error
from usae.core.model import UniversalSAE
from usae.core.sparse import sparse_decode_many, topk_encode
from usae.data.batches import aligned_batches
from usae.stats.reconstruction import R2Accumulator
from usae.train.checkpoint import list_checkpoints, resume, save_checkpoint
from usae.train.history import LogEntry, TrainHistory

__all__ = ["Trainer", "learning_rate"]

def adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """One model's AdamW: torch's fused kernel (one pass over each tensor instead of about eight) where it
    applies (float32 on CPU or CUDA), else the default implementation. Same formula; the roundings may differ
    from the default implementation's in the last bit. The fused kernel does not bump the parameters' version
    counters: ``Trainer.train_step`` does it after each step."""
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """LR at schedule position ``step``: warmup final_lr -> lr over warmup_steps, cosine to final_lr at steps."""
    if step < cfg.warmup_steps:
        return cfg.final_lr + (cfg.lr - cfg.final_lr) * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * progress))


class Trainer:
    """Trains a ``UniversalSAE`` (M = 1 gives an independent SAE with the same recipe).

    ``fused_encoder`` (class attribute, default True): encode with ``UniversalSAE.encode_train`` (exact
    sparse encoder backward, no dense weight-gradient GEMM; aux "none"/"auxk") or ``encode_pre_train`` (aux
    "official"); a subclass sets it False to go through ``_pre_activations`` and plain autograd.
    ``mixed_precision`` (class attribute, default False): bfloat16 encoder GEMM, CUDA only.
    """

    fused_encoder: bool = True
    mixed_precision: bool = False

    def __init__(self, model: UniversalSAE, config: TrainConfig, *, checkpoint_dir: str | os.PathLike | None = None,
                 progress: bool = True, keep_checkpoints: int = 2, split: str = "train", backend: str = "auto",
                 desc: str = "USAE") -> None:
        if not isinstance(model, UniversalSAE):
            raise ValueError(f"model of type {type(model).__name__} is not valid; expected a UniversalSAE")
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config of type {type(config).__name__} is not valid; expected a TrainConfig")
        if config.aux == "auxk" and config.auxk_k > model.n_latents:
            raise ValueError(f"TrainConfig.auxk_k = {config.auxk_k} is not valid; expected <= "
                             f"n_latents={model.n_latents}")
        positive_int("keep_checkpoints", keep_checkpoints)
        self.model, self.config = model, config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress, self.keep_checkpoints, self.split, self.backend = progress, keep_checkpoints, split, backend
        self.desc = desc  # the progress bar's label
        self.device = next(model.parameters()).device
        names, m = model.names, model.n_latents
        self.optimisers = [adamw(model.model_parameters(n), config) for n in names]
        self.step = 0
        self.picks = [0] * len(names)                 # times each model was selected
        self.generator = torch.Generator().manual_seed(config.seed)
        self.since_fire = torch.zeros(len(names), m, dtype=torch.int64, device=self.device)  # tokens, per encoder
        self.window = R2Accumulator(names, model.dims)  # running R² since the last log
        self.data_epoch, self.data_batch = 0, 0
        self.history = TrainHistory.empty(names)
        self._pending: list[tuple[int, int, float, tuple[int, ...], Tensor]] = []
        self._window_loss = (0.0, 0)                    # (sum, count) of the step losses since the last log
        self._resumed = False

    # -- one step -----------------------------------------------------------------------------------------
    def dead_mask(self, name: str) -> Tensor:
        """[m] bool: latents that have not fired for ``dead_after_tokens`` tokens encoded by model ``name``."""
        return self.since_fire[self.model.index(name)] >= self.config.dead_after_tokens

    # hooks a data-parallel trainer overrides (usae.train.distributed): BatchNorm statistics and gradients
    def _pre_activations(self, name: str, x: Tensor) -> Tensor:
        """Encoder pre-activations [N, m] of the selected model (training mode)."""
        return self.model.encode_pre(name, x)

    def _reduce_gradients(self, stepped: tuple[str, ...]) -> None:
        """Called after backward, before clipping and the optimizer steps (no-op in one process)."""

    def _pre_buffer(self, n: int) -> Tensor:
        """An [n, m] float32 buffer for the fused encoder's pre-activations, reused across steps."""
        buf = getattr(self, "_pre_workspace", None)
        if buf is None or buf.shape[0] != n or buf.device != self.device:
            buf = self._pre_workspace = torch.empty(n, self.model.n_latents, device=self.device)
        return buf

    def train_step(self, batch: Mapping[str, Tensor]) -> int:
        """One update on a batch of aligned rows {name: [N, d]}; returns the index of the selected model."""
        cfg, model, names = self.config, self.model, self.model.names
        x = {n: t.to(self.device, non_blocking=True) for n, t in model.check_batch(batch).items()}
        if model.encoder_kind == "batchnorm" and x[names[0]].shape[0] < 2:
            raise ValueError("batch has 1 row; BatchNorm training needs at least 2 rows per batch")
        i = int(torch.randint(len(names), (1,), generator=self.generator))
        name = names[i]
        stepped = names if cfg.update == "joint" else (name,)
        model.train()
        if self.mixed_precision and self.device.type != "cuda":
            raise ValueError(f"Trainer.mixed_precision = True is only supported on CUDA; the model is on {self.device}")
        dicts = {n: model.dictionary(n, frozen=n not in stepped) for n in names}
        dead = self.dead_mask(name) if cfg.aux == "auxk" else None
        pre, encoded = None, None
        if self.fused_encoder and cfg.aux != "official":
            out = self._pre_buffer(len(x[name])) if self.device.type != "cpu" or self.mixed_precision else None
            encoded = model.encode_train(name, x[name], dead=dead, out=out,
                                         bf16=self.mixed_precision)
            code = encoded.code
        else:
            if self.fused_encoder:
                pre = model.encode_pre_train(name, x[name], bf16=self.mixed_precision)
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16) if self.mixed_precision else nullcontext():
                    pre = self._pre_activations(name, x[name])
                pre = pre.float()
            code = topk_encode(pre, model.k)
        recon = dict(zip(names, sparse_decode_many(code, [dicts[n] for n in names], self.backend), strict=True))
        mains = {n: reconstruction_error(x[n], recon[n], cfg.loss) for n in names}
        zeros = {n: code.values.new_zeros(()) for n in names}
        if cfg.aux == "official":
            auxs = official_aux(x, recon, pre, code, dicts, cfg.loss)
        elif cfg.aux == "auxk" and pre is not None:
            auxs = auxk_aux(x, recon, pre, dead, cfg.auxk_k, dicts, cfg.loss, self.backend)
        elif cfg.aux == "auxk" and encoded is not None and encoded.dead_pre is not None:
            auxs = auxk_dense(x, recon, encoded.dead_pre, encoded.dead_columns, cfg.auxk_k, dicts, cfg.loss)
        else:
            auxs = zeros
        loss = sum(mains[n] + cfg.aux_coef * auxs[n] for n in names)
        model.zero_grad(set_to_none=True)
        loss.backward()
        self._reduce_gradients(stepped)
        lr_selected = 0.0
        for n in stepped:
            j = model.index(n)
            lr = learning_rate(cfg, self.step if cfg.schedule == "global" else self.picks[j])
            lr_selected = lr if j == i else lr_selected
            for group in self.optimisers[j].param_groups:
                group["lr"] = lr
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.model_parameters(n) if p.grad is not None],
                                               cfg.grad_clip)
            self.optimisers[j].step()
            for p in model.model_parameters(n):  # the fused kernel leaves version counters as they were; the
                increment_version(p)              # frozen-dictionary cache (UniversalSAE.dictionary) reads them
        with torch.no_grad():
            fired = torch.zeros(model.n_latents, dtype=torch.bool, device=self.device)
            fired[code.indices[code.values > 0]] = True
            self.since_fire[i] += len(code)
            self.since_fire[i][fired] = 0
            for j, n in enumerate(names):
                self.window.update(i, j, x[n], recon[n])
            terms = torch.stack([loss] + [mains[n] for n in names] + [auxs[n] for n in names]).detach()
        self._pending.append((self.step, i, lr_selected, tuple(self.picks), terms))
        self.picks[i] += 1
        self.step += 1
        return i

    # -- history ------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending:
            return
        values = torch.stack([p[-1] for p in self._pending]).cpu().tolist()
        h, m = self.history, len(self.model.names)
        for (step, i, lr, picks, _), row in zip(self._pending, values, strict=True):
            h.append(step, i, lr, row[0], row[1:1 + m], row[1 + m:1 + 2 * m], picks)
            self._window_loss = (self._window_loss[0] + row[0], self._window_loss[1] + 1)
        self._pending.clear()

    def _log(self) -> LogEntry:
        self._flush()
        names = self.model.names
        total, count = self._window_loss
        r2 = self.window.matrix("global")
        off = r2[~torch.eye(len(names), dtype=torch.bool)]
        off = off[torch.isfinite(off)]
        dead = (self.since_fire >= self.config.dead_after_tokens).cpu()
        entry = LogEntry(step=self.step, loss=total / max(1, count), r2=r2.tolist(),
                         r2_cross=off.mean().item() if off.numel() else float("nan"),
                         dead_fraction={n: dead[j].float().mean().item() for j, n in enumerate(names)},
                         dead_in_all=dead.all(0).float().mean().item())
        self.history.add_log(entry)
        self.window.reset()
        self._window_loss = (0.0, 0)
        return entry

    # -- data ---------------------------------------------------------------------------------------------
    def _epoch(self, source: Any, epoch: int) -> Any:
        seed = self.config.seed * 1_000_003 + epoch
        if isinstance(source, Mapping) or hasattr(source, "batches"):
            return aligned_batches(source, self.model.names, self.config.batch_size, split=self.split,
                                   shuffle=True, seed=seed, drop_last=True)
        return source

    def _batches(self, source: Any) -> Iterator[Any]:
        one_shot = not isinstance(source, Mapping) and not hasattr(source, "batches") and iter(source) is source
        epoch, skip = self.data_epoch, self.data_batch
        while True:
            count = 0
            for batch in self._epoch(source, epoch):
                count += 1
                if count > skip:
                    self.data_epoch, self.data_batch = epoch, count
                    yield batch
            if count == 0:
                raise ValueError("the training source yielded no batches (is the split empty or smaller than "
                                 f"batch_size={self.config.batch_size}?)")
            if one_shot:
                raise ValueError(f"the training source ran out after {count} batches, before step "
                                 f"{self.config.steps}; pass a list, a dict of tensors or a store to cycle it")
            epoch, skip = epoch + 1, 0

    # -- fit ----------------------------------------------------------------------------------------------
    def fit(self, source: Any) -> TrainHistory:
        """Train for ``config.steps`` steps (resuming from ``checkpoint_dir``); returns the whole run's history."""
        cfg = self.config
        if isinstance(source, Mapping):  # rows in memory: check them all before the first update
            for name, rows in source.items():
                rows = torch.as_tensor(rows)
                bad = ~torch.isfinite(rows) if rows.is_floating_point() else None
                if bad is not None and bool(bad.any()):
                    first = int(bad.reshape(len(rows), -1).any(1).nonzero()[0])
                    raise ValueError(f"the training rows of {name!r} contain NaN/Inf (first at row {first}); fix or "
                                     "drop those rows before training")
        if self.checkpoint_dir is not None and not self._resumed:
            self.resume()
        if self.step >= cfg.steps:
            return self.history
        stream = self._batches(source)
        saved_at = self.step
        with tqdm(total=cfg.steps, initial=self.step, desc=self.desc, disable=not self.progress) as bar:
            while self.step < cfg.steps:
                self.train_step(next(stream))
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    bar.set_postfix(loss=f"{self._log().loss:.4f}")
                if self.checkpoint_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
        if self.checkpoint_dir is not None and saved_at != self.step:
            self.save_checkpoint()
        self._flush()
        return self.history

    # -- checkpoints (usae.train.checkpoint) ---------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in ``checkpoint_dir``, oldest first."""
        return list_checkpoints(self.checkpoint_dir)

    def save_checkpoint(self) -> Path:
        """Write the full training state atomically to ``checkpoint_dir/step_XXXXXXXXX``; returns its path."""
        if self.checkpoint_dir is None:
            raise ValueError("save_checkpoint: this Trainer has no checkpoint_dir")
        self._flush()
        return save_checkpoint(self, self.checkpoint_dir, self.keep_checkpoints)

    def resume(self) -> Path | None:
        """Load the newest checkpoint of ``checkpoint_dir`` (``fit`` does this first); returns its path, or None."""
        self._resumed = True
        return resume(self, self.checkpoint_dir)
