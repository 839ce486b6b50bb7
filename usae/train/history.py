"""What ``Trainer.fit`` returns: the per-step record of a training run and its periodic log entries.

Both are plain data with ``to_dict``/``from_dict`` for ``history.json`` and the checkpoints' ``state.json``.
Per-model series are keyed by model name; ``model`` holds the index (in ``names``) of each step's encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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
    seconds: wall time of the fit when the caller measured it (``Experiment`` does); run: facts of a
    distributed run (world size, steps, ...), else None.
    """

    names: list[str]
    step: list[int] = field(default_factory=list)
    model: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    recon: dict[str, list[float]] = field(default_factory=dict)
    aux: dict[str, list[float]] = field(default_factory=dict)
    log: list[LogEntry] = field(default_factory=list)
    seconds: float | None = None
    run: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.names = list(self.names)
        for series in (self.recon, self.aux):
            for n in self.names:
                series.setdefault(n, [])

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
                   seconds=data.get("seconds"), run=data.get("run"))
