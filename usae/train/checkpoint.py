"""Trainer checkpoints: save the full training state atomically, list them, resume from the newest.

A checkpoint is a directory ``step_XXXXXXXXX/`` holding ``model.safetensors``, ``trainer.safetensors``
(optimiser moments, RNG state, firing counters, running R² sums, the history's per-step series) and
``state.json`` (step, schedule, data position, configs, the history's log), written to a temporary
directory and renamed, so a killed run never leaves a half-written "complete" checkpoint. Resuming restores
all of it, so the run continues bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from usae._io import disk_full
from usae.train.history import TrainHistory

if TYPE_CHECKING:
    from usae.train.trainer import Trainer

__all__ = ["list_checkpoints", "resume", "save_checkpoint"]

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


def list_checkpoints(folder: Path | None) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (none when ``folder`` is None or missing)."""
    if folder is None or not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def _identity(trainer: Trainer) -> dict[str, Any]:
    train = trainer.config.weights_dict()
    return {"train_config": train, "model_config": trainer.model.config(), "names": list(trainer.model.names)}


def save_checkpoint(trainer: Trainer, folder: Path, keep: int = 2) -> Path:
    """Write ``trainer``'s full state atomically to ``folder/step_XXXXXXXXX``, keeping the newest ``keep``
    checkpoints; returns its path. The trainer's pending history must be flushed first."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{trainer.step:09d}"
    if final.exists():
        raise ValueError(f"{final} already exists; refusing to overwrite a checkpoint")
    for stale in folder.glob(".*-step_*"):  # left by a killed run (temp or half-deleted)
        pid = stale.name.rsplit("-", 1)[-1]
        if not (stale.name.startswith(".tmp-") and pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-step_{trainer.step:09d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(trainer, tmp)
        os.replace(tmp, final)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise disk_full(final, err) from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep]:
        gone = old.with_name(f".old-{old.name}")  # renamed first: never a half-deleted "complete" checkpoint
        os.replace(old, gone)
        shutil.rmtree(gone)
    return final


def _write(self: Trainer, tmp: Path) -> None:
    """Every file of one checkpoint into the folder ``tmp``."""
    self.model.save(tmp / "model.safetensors")
    tensors: dict[str, Tensor] = {"rng": self.generator.get_state(), "since_fire": self.since_fire.cpu()}
    groups = []
    for j, opt in enumerate(self.optimisers):
        sd = opt.state_dict()
        groups.append(sd["param_groups"])
        for pid, slots in sd["state"].items():
            for key, value in slots.items():
                tensors[f"optim.{j}.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors.update({f"r2.{k}": v for k, v in self.window.state().items()})
    series, history = self.history.arrays()  # bounded (usae.train.history): constant cost per checkpoint
    tensors.update({f"history.{k}": v for k, v in series.items()})
    save_file(tensors, str(tmp / "trainer.safetensors"))
    state = {"format": _FORMAT, "step": self.step, "picks": self.picks,
             "data": {"epoch": self.data_epoch, "batch": self.data_batch},
             "param_groups": groups, "history": history, "window_loss": list(self._window_loss),
             **_identity(self)}
    (tmp / "state.json").write_text(json.dumps(state))


def resume(self: Trainer, folder: Path | None) -> Path | None:
    """Load the newest checkpoint in ``folder`` into the trainer ``self`` (ValueError when it was written with
    other configs); returns its path, or None when there is none."""
    found = list_checkpoints(folder)
    if not found:
        return None
    path = found[-1]
    state = json.loads((path / "state.json").read_text())
    if self.progress:
        tqdm.write(f"resuming from {path} (step {state.get('step')} of {self.config.steps})", file=sys.stderr)
    if state.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a USAE trainer checkpoint (format {state.get('format')!r})")
    mine = _identity(self)
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
    for j, opt in enumerate(self.optimisers):
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
    series = {k[len("history."):]: v for k, v in tensors.items() if k.startswith("history.")}
    # checkpoints of earlier versions hold the whole history as JSON
    self.history = TrainHistory.from_arrays(series, state["history"]) if series else \
        TrainHistory.from_dict(state["history"])
    if "window_loss" in state:
        total, count = state["window_loss"]
    else:  # earlier versions: the history is complete and the window is the steps after the last log entry
        tail = self.history.loss[self.history.log[-1].step if self.history.log else 0:]
        total, count = sum(tail), len(tail)
    self._window_loss = (float(total), int(count))
    return path
