"""What ``Trainer.fit`` returns: the per-step record of a training run and its periodic log entries.

Both are plain data with ``to_dict``/``from_dict`` for ``history.json``; checkpoints keep the per-step series as
arrays (``arrays``/``from_arrays``) and the rest as JSON. Per-model series are keyed by model name; ``model``
holds the index (in ``names``) of each step's encoder.

The record is bounded, so that a paper-scale run (1.2 M steps) costs the same memory and the same bytes per
checkpoint as a run of ``max_points`` steps: when more than ``max_points`` steps are kept, every other one is
dropped and ``stride`` doubles, so the kept steps are exactly those whose step number is a multiple of
``stride`` (between ``max_points / 2`` and ``max_points`` of them, evenly spread over the whole run, each a real
step with its own model, learning rate and losses). The log is thinned the same way beyond ``max_log`` entries
(``log_stride``: the kept entries are every ``log_stride``-th one written). A run shorter than ``max_points``
steps keeps every step (``stride == 1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["LogEntry", "TrainHistory"]


@dataclass
class LogEntry:
    """One log point (every ``TrainConfig.log_every`` steps and at the end).

    step: steps done; loss: mean total loss since the previous entry; r2: [M][M] running R² (global baseline,
    row = encoder, column = decoder, ``names`` order) over the batches since the previous entry; r2_cross: mean
    of its finite off-diagonal entries; dead_fraction: per encoder name, the share of latents that have not
    fired for ``TrainConfig.dead_after_tokens`` tokens; dead_in_all: the share dead in every encoder.
    """

    step: int
    loss: float
    r2: list[list[float]]
    r2_cross: float
    dead_fraction: dict[str, float]
    dead_in_all: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogEntry:
        return cls(int(data["step"]), float(data["loss"]), [list(map(float, r)) for r in data["r2"]],
                   float(data["r2_cross"]), {str(k): float(v) for k, v in data["dead_fraction"].items()},
                   float(data["dead_in_all"]))


@dataclass
class TrainHistory:
    """The record of a training run, one entry per step in ``step``, ``model``, ``lr``, ``loss``.

    names: the models, in the USAE's order; step: [T] global step of each update; model: [T] index into
    ``names`` of the encoder selected at that step; lr: [T] learning rate used; loss: [T] total loss
    (reconstruction into every decoder plus the weighted auxiliary loss); recon / aux: name -> [T]
    reconstruction and auxiliary loss into that model's decoder; log: the periodic ``LogEntry`` points;
    picks: [T][M] how many times each model had been selected before that step (what the official per-model
    schedule reads; empty in histories of earlier versions, which keep every step instead);
    seconds: wall time of the fit when the caller measured it (``Experiment`` does); run: facts of a
    distributed run (world size, steps, ...), else None; stride / log_stride: the thinning (module docstring);
    max_points / max_log: the bounds; log_seen: log entries ever added (kept or not).
    """

    names: list[str]
    step: list[int] = field(default_factory=list)
    model: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    recon: dict[str, list[float]] = field(default_factory=dict)
    aux: dict[str, list[float]] = field(default_factory=dict)
    log: list[LogEntry] = field(default_factory=list)
    picks: list[list[int]] = field(default_factory=list)
    seconds: float | None = None
    run: dict[str, Any] | None = None
    stride: int = 1
    log_stride: int = 1
    max_points: int = 16384
    max_log: int = 4096
    log_seen: int = 0

    def __post_init__(self) -> None:
        self.names = list(self.names)
        for series in (self.recon, self.aux):
            for n in self.names:
                series.setdefault(n, [])
        for key in ("stride", "log_stride", "max_points", "max_log"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (2 if key.startswith("max") else 1):
                raise ValueError(f"TrainHistory.{key} = {value!r} is not valid; expected an integer >= "
                                 f"{2 if key.startswith('max') else 1}")
        if self.log_stride == 1:  # a log that was never thinned: every entry ever added is there
            self.log_seen = max(self.log_seen, len(self.log))

    @property
    def complete(self) -> bool:
        """True when every step is kept (no thinning happened)."""
        return self.stride == 1

    def append(self, step: int, model: int, lr: float, loss: float, recon: Sequence[float],
               aux: Sequence[float], picks: Sequence[int]) -> None:
        """Record one step (``recon``/``aux``/``picks`` in ``names`` order); kept when ``step`` is a multiple of
        ``stride``."""
        if step % self.stride:
            return
        self.picks.append(list(picks))
        self.step.append(step)
        self.model.append(model)
        self.lr.append(lr)
        self.loss.append(loss)
        for n, r, a in zip(self.names, recon, aux, strict=True):
            self.recon[n].append(r)
            self.aux[n].append(a)
        if len(self.step) > self.max_points:
            self.stride *= 2
            keep = [t for t, s in enumerate(self.step) if s % self.stride == 0]
            for series in (self.step, self.model, self.lr, self.loss, self.picks, *self.recon.values(),
                           *self.aux.values()):
                series[:] = [series[t] for t in keep]

    def add_log(self, entry: LogEntry) -> None:
        """Append a log entry (every ``log_stride``-th one is kept; the log halves when it passes ``max_log``)."""
        if self.log_seen % self.log_stride == 0:
            self.log.append(entry)
            if len(self.log) > self.max_log:
                self.log[:] = self.log[::2]
                self.log_stride *= 2
        self.log_seen += 1

    @classmethod
    def empty(cls, names: Sequence[str]) -> TrainHistory:
        """A history with no steps for models ``names``."""
        return cls(list(names))

    def picked(self, name: str) -> list[int]:
        """Positions (into the per-step series) of the steps whose encoder was ``name``."""
        if name not in self.names:
            raise ValueError(f"model {name!r} is not valid; expected one of {self.names}")
        i = self.names.index(name)
        return [t for t, chosen in enumerate(self.model) if chosen == i]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (the ``history.json`` layout)."""
        out = asdict(self)
        for key in ("seconds", "run"):
            if out[key] is None:
                del out[key]
        return out

    _SERIES = ("step", "model", "lr", "loss")

    def arrays(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The per-step series as tensors {key: [T]} (int64 steps and models, float64 values) and everything
        else as JSON data: what a checkpoint stores (``from_arrays`` reads both back)."""
        tensors = {"step": torch.tensor(self.step, dtype=torch.int64),
                   "model": torch.tensor(self.model, dtype=torch.int64),
                   "lr": torch.tensor(self.lr, dtype=torch.float64),
                   "loss": torch.tensor(self.loss, dtype=torch.float64)}
        tensors["picks"] = torch.tensor(self.picks, dtype=torch.int64).reshape(len(self.picks), len(self.names))
        for j, n in enumerate(self.names):
            tensors[f"recon.{j}"] = torch.tensor(self.recon[n], dtype=torch.float64)
            tensors[f"aux.{j}"] = torch.tensor(self.aux[n], dtype=torch.float64)
        rest = self.to_dict()
        for key in (*self._SERIES, "recon", "aux", "picks"):
            del rest[key]
        return tensors, rest

    @classmethod
    def from_arrays(cls, tensors: Mapping[str, Tensor], rest: Mapping[str, Any]) -> TrainHistory:
        """The history that ``arrays`` split into tensors and JSON data."""
        names = list(rest["names"])
        data = dict(rest)
        data.update({key: tensors[key].tolist() for key in cls._SERIES})
        data["picks"] = tensors["picks"].tolist()
        data["recon"] = {n: tensors[f"recon.{j}"].tolist() for j, n in enumerate(names)}
        data["aux"] = {n: tensors[f"aux.{j}"].tolist() for j, n in enumerate(names)}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainHistory:
        """The history written by ``to_dict`` (or by an older version, as a plain dict with the same keys)."""
        if "names" not in data:
            raise ValueError(f"a training history needs 'names'; this one has keys {sorted(data)}")
        return cls(names=list(data["names"]), step=list(data.get("step", [])), model=list(data.get("model", [])),
                   lr=list(data.get("lr", [])), loss=list(data.get("loss", [])),
                   recon={k: list(v) for k, v in data.get("recon", {}).items()},
                   aux={k: list(v) for k, v in data.get("aux", {}).items()},
                   log=[LogEntry.from_dict(e) for e in data.get("log", [])],
                   picks=[list(map(int, p)) for p in data.get("picks", [])],
                   seconds=data.get("seconds"), run=data.get("run"), stride=int(data.get("stride", 1)),
                   log_stride=int(data.get("log_stride", 1)), max_points=int(data.get("max_points", 16384)),
                   max_log=int(data.get("max_log", 4096)), log_seen=int(data.get("log_seen", 0)))
