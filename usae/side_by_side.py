"""Several SAEs of one experiment trained at once (:meth:`usae.Experiment.train_side_by_side`): a
:class:`Training` names one of them, :func:`train_in_workers` trains a list of them in worker processes with
one torch thread each (``usae._workers``), each writing its artifact into the experiment's runs cache."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from usae._workers import Call, Done, run_calls
from usae.config import ExperimentConfig

if TYPE_CHECKING:
    from usae.experiment import Experiment

__all__ = ["Training", "train_in_workers"]


@dataclass(frozen=True)
class Training:
    """One SAE for :meth:`Experiment.train_side_by_side`. ``Training()`` is ``exp.usae()``,
    ``Training(init="official")`` is ``exp.usae(init="official")``, ``Training(model="toy_vit")`` is
    ``exp.independent_sae("toy_vit")``; ``changes``: ``((field, value), ...)``, the keyword arguments of those
    methods (TrainConfig fields, and ``seed`` for an independent SAE)."""

    model: str | None = None
    init: str | None = None
    changes: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.changes, tuple) or not all(
                isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], str) for c in self.changes):
            raise ValueError(f"Training: changes = {self.changes!r} is not valid; expected a tuple of "
                             "(field, value) pairs, e.g. (('update', 'joint'),)")
        if self.model is not None and self.init is not None:
            raise ValueError(f"Training: init = {self.init!r} is only valid for the USAE (model = None); an "
                             f"independent SAE ({self.model!r}) starts as the USAE's config says")

    def train(self, exp: Experiment) -> None:
        """Train (or find cached) this SAE of ``exp`` in this process."""
        if self.model is None:
            exp.usae(init=self.init, **dict(self.changes))
        else:
            exp.independent_sae(self.model, **dict(self.changes))

    def label(self) -> str:
        what = "USAE" if self.model is None else f"SAE {self.model}"
        extra = ([f"init={self.init}"] if self.init else []) + [f"{k}={v!r}" for k, v in self.changes]
        return f"{what} ({', '.join(extra)})" if extra else what


def _training_worker(spec_json: str) -> None:
    """Entry of a training worker process (``python -c``): one thread, train one SAE into the runs cache."""
    from usae.experiment import Experiment

    torch.set_num_threads(1)
    spec = json.loads(spec_json)
    exp = Experiment(ExperimentConfig.from_dict(spec["config"]), runs=spec["runs"], progress=False)
    Training(spec["model"], spec["init"], tuple((k, v) for k, v in spec["changes"])).train(exp)


def train_in_workers(exp: Experiment, jobs: list[Training], workers: int) -> None:
    """Train ``jobs`` in up to ``workers`` fresh interpreter processes at once (one torch thread each)."""
    bar = tqdm(total=len(jobs), desc=f"train {len(jobs)} SAEs side by side", disable=not exp.progress, leave=False)

    def on_done(done: Done) -> None:
        if not done.ok:
            raise RuntimeError(f"training {jobs[int(done.key)].label()} failed (exit code {done.returncode}): "
                               f"{done.last_error_line or 'no message'}")
        bar.update(1)

    calls = [Call(i, "usae.side_by_side", "_training_worker",
                  (json.dumps({"config": exp.config.to_dict(), "runs": str(exp.runs), "model": job.model,
                               "init": job.init, "changes": [list(c) for c in job.changes]}),))
             for i, job in enumerate(jobs)]
    try:
        run_calls(calls, workers, {**os.environ, "OMP_NUM_THREADS": "1"}, on_done)
    finally:
        bar.close()
