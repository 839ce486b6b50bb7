"""Building the toy zoo's folder: every toy model of ``usae.data.toyzoo`` trained and scored, its weights, heads
and report written atomically.

On a multi-core CPU each model trains in its own worker process with one torch thread (``usae._workers``),
and once every worker has timed its first steps, the ones with the most CPU time left keep their cores while
the others run at lower priority. Scheduling never changes a result: each model depends only on its seed and
its thread count.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from usae._checks import positive_int
from usae._io import atomic_write
from usae._workers import Call, Done, run_calls
from usae.config import ToyWorldConfig, ZooTrainConfig
from usae.data import toyzoo
from usae.data.toyworld import ToyWorld

__all__ = ["train_toy_zoo"]


def _contiguous(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def _train_and_save(name: str, world_cfg: Any, cfg: ZooTrainConfig, work: Path, progress: bool,
                    device: str | torch.device, threads: int | None,
                    on_step: Callable[[int, int], None] | None = None) -> dict:
    """Train one toy model (``threads`` torch threads when given), write its weights and heads into ``work``,
    and return its report entry. Runs in a worker process when the zoo trains models side by side."""
    if threads is not None:
        torch.set_num_threads(threads)
    world = ToyWorld(world_cfg)
    train = world.batch("zoo", 0, cfg.n_train_images)
    val = world.batch("val", 0, cfg.n_val_images)
    started = time.perf_counter()
    backbone, heads, final_loss = toyzoo.train_one(name, train.images, toyzoo.task_labels(train), cfg, progress, device,
                                            on_step=on_step)
    seconds = time.perf_counter() - started
    scores = toyzoo.evaluate(backbone, heads, val.images, toyzoo.task_labels(val))
    model = backbone.model                     # the timm model: its state_dict is what zoo.load_backbone reads
    atomic_write(work / f"{name}.safetensors", lambda p: save_file(_contiguous(model.state_dict()), str(p)))
    atomic_write(work / f"{name}.heads.safetensors",
                 lambda p: save_file(_contiguous(heads.state_dict()), str(p), {"pool": heads.pool}))
    entry: dict = {t: s["value"] for t, s in scores.items()}
    entry["metric"] = {t: s["metric"] for t, s in scores.items()}
    entry["chance"] = {t: s["chance"] for t, s in scores.items()}
    entry["f1"] = {t: s["f1"] for t, s in scores.items() if "f1" in s}
    entry["params"] = int(sum(p.numel() for p in model.parameters()))
    entry["steps"] = cfg.steps_of(name)
    entry["seconds"] = round(seconds, 2)
    entry["final_loss"] = final_loss
    return entry


def _worker_main(spec_json: str) -> None:
    """Entry of a zoo worker process (``python -c``): train one model and write ``<work>/<name>.report.json``."""
    spec = json.loads(spec_json)
    work, name = Path(spec["work"]), spec["name"]

    start = {"cpu": 0.0}

    def report_progress(done: int, steps: int) -> None:
        if done == 1:              # the first step's end: start-up and rendering are behind
            start["cpu"] = time.process_time()
        elif done % _PROGRESS_EVERY == 0:
            text = json.dumps({"done": done - 1, "steps": steps - 1, "cpu_seconds": time.process_time() - start["cpu"]})
            atomic_write(work / f"{name}.progress.json", lambda p: p.write_text(text))

    entry = _train_and_save(name, ToyWorldConfig.from_dict(spec["world"]), ZooTrainConfig.from_dict(spec["zoo"]),
                            work, False, "cpu", 1, report_progress)
    atomic_write(work / f"{name}.report.json", lambda p: p.write_text(json.dumps(entry)))


_PROGRESS_EVERY = 25    # steps between a zoo worker's progress reports
_NICE = 10              # niceness of the workers that yield to the longest ones


def _yielding(remaining: dict[str, float], cores: int) -> set[str]:
    """The workers that should run at lower priority: all but the ``cores - 1`` with the most CPU seconds
    left (``remaining``), when more workers run than there are cores; none otherwise.

    Fair sharing of 2 cores among 3 one-thread workers starves the longest model early and the zoo ends when
    it does; letting it keep a core while the others share the other one ends the zoo near its total CPU time
    over the cores (longest-remaining-first)."""
    if len(remaining) <= cores:
        return set()
    keep = sorted(remaining, key=lambda n: -remaining[n])[:max(cores - 1, 1)]
    return set(remaining) - set(keep)


def _train_in_workers(world: ToyWorld, cfg: ZooTrainConfig, work: Path, progress: bool, workers: int) -> dict:
    """Train the zoo's models in up to ``workers`` fresh interpreter processes with one thread each."""
    report: dict[str, dict] = {}
    prioritised = False
    cores = os.cpu_count() or 1
    bar = tqdm(total=len(cfg.models), desc="train toy zoo (models, in parallel)", disable=not progress, leave=False)

    def on_poll(pids: dict, n_pending: int) -> None:
        # once every worker has started and timed its first steps, the longest ones keep their cores (a
        # scheduling hint only: each model's result does not depend on it)
        nonlocal prioritised
        if n_pending or prioritised:
            return
        remaining = _remaining_cpu(work, list(pids))
        if remaining is not None:
            prioritised = True
            for name in _yielding(remaining, cores):
                try:
                    os.setpriority(os.PRIO_PROCESS, pids[name], _NICE)
                except OSError:
                    pass

    def on_done(done: Done) -> None:
        name = str(done.key)
        if not done.ok:
            raise RuntimeError(f"training toy model {name!r} failed (exit code {done.returncode}): "
                               f"{done.last_error_line or 'no message'}")
        report[name] = json.loads((work / f"{name}.report.json").read_text())
        (work / f"{name}.report.json").unlink()
        (work / f"{name}.progress.json").unlink(missing_ok=True)
        bar.update(1)

    calls = [Call(name, "usae.data.toyzoo_build", "_worker_main",
                  (json.dumps({"name": name, "world": world.cfg.to_dict(), "zoo": cfg.to_dict(), "work": str(work)}),))
             for name in cfg.models]
    try:
        run_calls(calls, workers, {**os.environ, "OMP_NUM_THREADS": "1"}, on_done, on_poll=on_poll)
    finally:
        bar.close()
    return {name: report[name] for name in cfg.models}


def _remaining_cpu(work: Path, names: list[str]) -> dict[str, float] | None:
    """CPU seconds each worker of ``names`` still needs to train, from its progress report (its CPU time per
    step since its first step); None until every one of them has reported."""
    out = {}
    for name in names:
        try:
            p = json.loads((work / f"{name}.progress.json").read_text())
        except (OSError, ValueError):
            return None
        out[name] = p["cpu_seconds"] / p["done"] * (p["steps"] - p["done"])
    return out


def train_toy_zoo(world: ToyWorld, cfg: ZooTrainConfig, out_dir: Path, progress: bool = True,
                  device: str | torch.device = "cpu", workers: int | None = None) -> dict:
    """Train every model of ``cfg.models`` on split "zoo" and score it on split "val".

    Writes ``<out_dir>/<name>.safetensors`` (the timm model's state_dict, for ``zoo.load_backbone``),
    ``<name>.heads.safetensors`` and ``report.json`` (written last) ``{name: {task: value, "metric": {task:
    "mAP" | "accuracy"}, "chance": {task: value}, "f1": {...}, "params", "steps", "seconds", "final_loss"}}``.
    A missing ``out_dir`` is built in a temporary sibling and renamed into place at the end; an existing
    one (e.g. the caller's own temporary folder) gets each file written atomically. ``device``: where to
    train (the book trains on CPU). ``workers``: on CPU, models trained side by side in that many processes
    with one torch thread each (default: one per model when the machine has two or more cores; 1 trains them
    in turn in this process). Toy models are too small to use two threads well, so one-thread workers train
    the zoo about 1.7x faster on 2 cores; one process per model, rather than one per core, lets the system
    share the cores among models of uneven cost (the zoo then takes about its total CPU time over the cores,
    not the longest chain of models one worker trains in turn). Each model's result depends only on its seed
    and its thread count.
    Returns the report.
    """
    if not isinstance(world, ToyWorld):
        raise ValueError(f"train_toy_zoo: world = {world!r} is not valid; expected a ToyWorld")
    if not isinstance(cfg, ZooTrainConfig):
        raise ValueError(f"train_toy_zoo: cfg = {cfg!r} is not valid; expected a ZooTrainConfig")
    toyzoo.task_design(cfg.models)                              # unknown model names fail here
    if workers is None:
        workers = 1 if torch.device(device).type != "cpu" or (os.cpu_count() or 1) < 2 else len(cfg.models)
    positive_int("train_toy_zoo: workers", workers)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"train_toy_zoo: out_dir = {str(out_dir)!r} exists and is not a folder")
    fresh = not out_dir.exists()
    work = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}") if fresh else out_dir
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    try:
        if workers == 1:
            report = {name: _train_and_save(name, world.cfg, cfg, work, progress, device, None)
                      for name in cfg.models}
        else:
            report = _train_in_workers(world, cfg, work, progress, workers)
        atomic_write(work / "report.json", lambda p: p.write_text(json.dumps(report, indent=1)))
        if fresh:
            os.replace(work, out_dir)
    finally:
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
    return report
