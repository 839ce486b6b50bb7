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

Checkpoints (``checkpoint_dir``, every ``checkpoint_every`` steps and at the end) are directories
``step_XXXXXXXXX/`` holding ``model.safetensors``, ``trainer.safetensors`` (optimizer moments, RNG state,
firing counters, running R² sums) and ``state.json`` (step, schedule, data position, configs, history),
written to a temporary directory and renamed. ``fit`` resumes from the latest one when its configs match
(resume skips the batches already consumed, so it reproduces the uninterrupted run bit for bit).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from usae.config import TrainConfig
from usae.losses import auxk_aux, auxk_dense, official_aux, reconstruction_error
from usae.model import UniversalSAE
from usae.paths import disk_full
from usae.reconstruction import R2Accumulator, aligned_batches
from usae.sparse import sparse_decode_many, topk_encode

__all__ = ["Trainer", "learning_rate"]

_FORMAT = "usae.Trainer/1"


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (it may belong to someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                 progress: bool = True, keep_checkpoints: int = 2, split: str = "train", backend: str = "auto") -> None:
        if not isinstance(model, UniversalSAE):
            raise ValueError(f"model of type {type(model).__name__} is not valid; expected a UniversalSAE")
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config of type {type(config).__name__} is not valid; expected a TrainConfig")
        if config.aux == "auxk" and config.auxk_k > model.n_latents:
            raise ValueError(f"TrainConfig.auxk_k = {config.auxk_k} is not valid; expected <= "
                             f"n_latents={model.n_latents}")
        if not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints = {keep_checkpoints!r} is not valid; expected an integer >= 1")
        self.model, self.config = model, config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress, self.keep_checkpoints, self.split, self.backend = progress, keep_checkpoints, split, backend
        self.device = next(model.parameters()).device
        names, m = model.names, model.n_latents
        self.optimizers = [torch.optim.AdamW(model.model_parameters(n), lr=config.lr,
                                             weight_decay=config.weight_decay) for n in names]
        self.step = 0
        self.picks = [0] * len(names)                 # times each model was selected
        self.generator = torch.Generator().manual_seed(config.seed)
        self.since_fire = torch.zeros(len(names), m, dtype=torch.int64, device=self.device)  # tokens, per encoder
        self.window = R2Accumulator(names, model.dims)  # running R² since the last log
        self.data_epoch, self.data_batch = 0, 0
        self.history: dict[str, Any] = {"names": list(names), "step": [], "model": [], "lr": [], "loss": [],
                                        "recon": {n: [] for n in names}, "aux": {n: [] for n in names}, "log": []}
        self._pending: list[tuple[int, int, float, Tensor]] = []
        self._resumed = False

    # -- one step -----------------------------------------------------------------------------------------
    def dead_mask(self, name: str) -> Tensor:
        """[m] bool: latents that have not fired for ``dead_after_tokens`` tokens encoded by model ``name``."""
        return self.since_fire[self.model.index(name)] >= self.config.dead_after_tokens

    # hooks a data-parallel trainer overrides (usae.distributed): BatchNorm statistics and gradients
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
        pre, dead_pre = None, None
        if self.fused_encoder and cfg.aux != "official":
            code, dead_pre = model.encode_train(name, x[name], dead=dead, out=self._pre_buffer(len(x[name])),
                                                bf16=self.mixed_precision)
        else:
            if self.fused_encoder:
                pre = model.encode_pre_train(name, x[name], bf16=self.mixed_precision)
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16) if self.mixed_precision else nullcontext():
                    pre = self._pre_activations(name, x[name])
                pre = pre.float()
            code = topk_encode(pre, model.k)
        recon = dict(zip(names, sparse_decode_many(code, [dicts[n] for n in names], self.backend)))
        mains = {n: reconstruction_error(x[n], recon[n], cfg.loss) for n in names}
        zeros = {n: code.values.new_zeros(()) for n in names}
        if cfg.aux == "official":
            auxs = official_aux(x, recon, pre, code, dicts, cfg.loss)
        elif cfg.aux == "auxk" and pre is not None:
            auxs = auxk_aux(x, recon, pre, dead, cfg.auxk_k, dicts, cfg.loss, self.backend)
        elif cfg.aux == "auxk" and dead_pre is not None:
            auxs = auxk_dense(x, recon, dead_pre[0], dead_pre[1], cfg.auxk_k, dicts, cfg.loss)
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
            for group in self.optimizers[j].param_groups:
                group["lr"] = lr
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.model_parameters(n) if p.grad is not None],
                                               cfg.grad_clip)
            self.optimizers[j].step()
        with torch.no_grad():
            fired = torch.zeros(model.n_latents, dtype=torch.bool, device=self.device)
            fired[code.indices[code.values > 0]] = True
            self.since_fire[i] += len(code)
            self.since_fire[i][fired] = 0
            for j, n in enumerate(names):
                self.window.update(i, j, x[n], recon[n])
            terms = torch.stack([loss] + [mains[n] for n in names] + [auxs[n] for n in names]).detach()
        self._pending.append((self.step, i, lr_selected, terms))
        self.picks[i] += 1
        self.step += 1
        return i

    # -- history ------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending:
            return
        values = torch.stack([p[3] for p in self._pending]).cpu().tolist()
        h, names = self.history, self.model.names
        for (step, i, lr, _), row in zip(self._pending, values):
            h["step"].append(step)
            h["model"].append(i)
            h["lr"].append(lr)
            h["loss"].append(row[0])
            for j, n in enumerate(names):
                h["recon"][n].append(row[1 + j])
                h["aux"][n].append(row[1 + len(names) + j])
        self._pending.clear()

    def _log(self) -> dict[str, Any]:
        self._flush()
        h, names = self.history, self.model.names
        since = h["log"][-1]["step"] if h["log"] else 0
        r2 = self.window.matrix("global")
        off = r2[~torch.eye(len(names), dtype=torch.bool)]
        off = off[torch.isfinite(off)]
        dead = (self.since_fire >= self.config.dead_after_tokens).cpu()
        entry = {"step": self.step, "loss": sum(h["loss"][since:]) / max(1, self.step - since),
                 "r2": r2.tolist(), "r2_cross": off.mean().item() if off.numel() else float("nan"),
                 "dead_fraction": {n: dead[j].float().mean().item() for j, n in enumerate(names)},
                 "dead_in_all": dead.all(0).float().mean().item()}
        h["log"].append(entry)
        self.window.reset()
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
    def fit(self, source: Any) -> dict[str, Any]:
        """Train for ``config.steps`` steps (resuming from ``checkpoint_dir``); returns the history dict."""
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
            self._resume()
        if self.step >= cfg.steps:
            return self.history
        stream = self._batches(source)
        saved_at = self.step
        with tqdm(total=cfg.steps, initial=self.step, desc="USAE", disable=not self.progress) as bar:
            while self.step < cfg.steps:
                self.train_step(next(stream))
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    bar.set_postfix(loss=f"{self._log()['loss']:.4f}")
                if self.checkpoint_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
        if self.checkpoint_dir is not None and saved_at != self.step:
            self.save_checkpoint()
        self._flush()
        return self.history

    # -- checkpoints --------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in ``checkpoint_dir``, oldest first."""
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return []
        found = [p for p in self.checkpoint_dir.glob("step_*") if (p / "state.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def _identity(self) -> dict[str, Any]:
        train = self.config.weights_dict()
        return {"train_config": train, "model_config": self.model.config(), "names": list(self.model.names)}

    def save_checkpoint(self) -> Path:
        """Write the full training state atomically to ``checkpoint_dir/step_XXXXXXXXX``; returns its path."""
        if self.checkpoint_dir is None:
            raise ValueError("save_checkpoint: this Trainer has no checkpoint_dir")
        self._flush()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_dir / f"step_{self.step:09d}"
        if final.exists():
            raise ValueError(f"{final} already exists; refusing to overwrite a checkpoint")
        for stale in self.checkpoint_dir.glob(".*-step_*"):  # left by a killed run (temp or half-deleted)
            pid = stale.name.rsplit("-", 1)[-1]
            if not (stale.name.startswith(".tmp-") and pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = self.checkpoint_dir / f".tmp-step_{self.step:09d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            self._write_checkpoint(tmp)
            os.replace(tmp, final)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise disk_full(final, err) from err
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.checkpoints()[:-self.keep_checkpoints]:
            gone = old.with_name(f".old-{old.name}")  # renamed first: never a half-deleted "complete" checkpoint
            os.replace(old, gone)
            shutil.rmtree(gone)
        return final

    def _write_checkpoint(self, tmp: Path) -> None:
        """Every file of one checkpoint into the folder ``tmp``."""
        self.model.save(tmp / "model.safetensors")
        tensors: dict[str, Tensor] = {"rng": self.generator.get_state(), "since_fire": self.since_fire.cpu()}
        groups = []
        for j, opt in enumerate(self.optimizers):
            sd = opt.state_dict()
            groups.append(sd["param_groups"])
            for pid, slots in sd["state"].items():
                for key, value in slots.items():
                    tensors[f"optim.{j}.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors.update({f"r2.{k}": v for k, v in self.window.state().items()})
        save_file(tensors, str(tmp / "trainer.safetensors"))
        state = {"format": _FORMAT, "step": self.step, "picks": self.picks,
                 "data": {"epoch": self.data_epoch, "batch": self.data_batch},
                 "param_groups": groups, "history": self.history, **self._identity()}
        (tmp / "state.json").write_text(json.dumps(state))

    def _resume(self) -> None:
        self._resumed = True
        found = self.checkpoints()
        if not found:
            return
        path = found[-1]
        state = json.loads((path / "state.json").read_text())
        if self.progress:
            tqdm.write(f"resuming from {path} (step {state.get('step')} of {self.config.steps})", file=sys.stderr)
        if state.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a USAE trainer checkpoint (format {state.get('format')!r})")
        mine = self._identity()
        diffs = [f"{key}.{k}: checkpoint {state[key].get(k)!r} vs now {mine[key].get(k)!r}"
                 for key in ("train_config", "model_config")
                 for k in sorted(set(state[key]) | set(mine[key])) if state[key].get(k) != mine[key].get(k)]
        if state["names"] != mine["names"]:
            diffs.append(f"names: checkpoint {state['names']} vs now {mine['names']}")
        if diffs:
            raise ValueError(f"{path} was written with another config ({'; '.join(diffs)}); use another "
                             "checkpoint_dir or remove it")
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            self.model.load_tensors({k: f.get_tensor(k).to(self.device) for k in f.keys()})
        with safe_open(str(path / "trainer.safetensors"), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for j, opt in enumerate(self.optimizers):
            slots: dict[int, dict[str, Tensor]] = {}
            prefix = f"optim.{j}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    pid, slot = key[len(prefix):].split(".", 1)
                    slots.setdefault(int(pid), {})[slot] = value.to(self.device)
            opt.load_state_dict({"state": slots, "param_groups": state["param_groups"][j]})
        self.generator.set_state(tensors["rng"])
        self.since_fire = tensors["since_fire"].to(self.device)
        self.window.load_state({k[3:]: v for k, v in tensors.items() if k.startswith("r2.")})
        self.step, self.picks = state["step"], list(state["picks"])
        self.data_epoch, self.data_batch = state["data"]["epoch"], state["data"]["batch"]
        self.history = state["history"]
