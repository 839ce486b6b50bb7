"""Timing one USAE training step: ours (``Trainer.train_step``) against the official step
(``usae.perf.reference``) and the floor (the forward GEMM plus our sparse kernels), at the paper's shape, in
one process.

``interleaved`` is the one fair harness of ``usae bench``: the same warm-up for every side, interleaved timed
samples, and a quiet-machine guard (the other processes' CPU use during the samples; above
``NOISE_LIMIT_CORES`` the run is "noisy, not a result"). ``measure_steps`` times the step variants with it;
``fit_vs_step`` compares ``Trainer.fit`` over an on-disk store with the bare step. Used by the ``step`` bench
entry (``usae.perf.step``), the step anatomy and chapter 10.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from usae.perf.reference import OfficialReference

PAPER_DIMS: dict[str, int] = {"dinov2": 384, "siglip": 768, "vit": 768}
PAPER_LATENTS, PAPER_K, PAPER_BATCH = 6144, 32, 6272
# AuxK's cost grows with the number of dead latents. The timed setting marks 10 % dead (614 of 6144, more
# than k_aux = 512, so every token still decodes its full k_aux); ``ours_auxk_all`` (every latent dead) is
# the worst case, reported beside it.
AUXK_DEAD_FRACTION = 0.10


# ---------------------------------------------------------------------------------------------- timing
def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a clock reading includes it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Wall seconds of one ``fn()``, synchronised on CUDA before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                device: str | torch.device = "cpu") -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (synchronising on CUDA)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


# ---------------------------------------------------------------------------------------------- fair rounds
NOISE_LIMIT_CORES = 0.2  # other processes' mean CPU use above which a timing run is "noisy, not a result"
# /proc/stat counts in ticks of 1/100 s: over less timed wall time than this, one stray tick reads as a
# tenth of a core or more, so the guard cannot tell quiet from busy (``noisy`` is None)
GUARD_MIN_SECONDS = 2.0


def _busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (``/proc/stat``; None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    """One side of an interleaved measurement: wall seconds of each timed sample, and the CPU cores that other
    processes used during each sample (NaN where the machine does not tell)."""

    samples: list[float]
    other_cores: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        """(fastest, slowest) sample."""
        return min(self.samples), max(self.samples)


@dataclass
class Timings:
    """An interleaved measurement of several sides: ``sides`` name -> Timing; ``other_cores``: the other
    processes' mean CPU use over all timed samples (time-weighted; from ``/proc/stat`` at 1/100 s resolution, so
    a single short sample is coarse but the mean is not); ``noisy``: it exceeded ``NOISE_LIMIT_CORES``, so the
    run is not a result (None where the machine does not tell, or where the timed samples add up to less than
    ``GUARD_MIN_SECONDS``: too short for the tick counts to tell)."""

    sides: dict[str, Timing]
    other_cores: float
    noisy: bool | None

    def medians(self) -> dict[str, float]:
        return {n: t.median for n, t in self.sides.items()}


def interleaved(calls: Mapping[str, Callable[[], object]], samples: int = 5, warmup: int = 2, *,
                device: str | torch.device = "cpu", progress: bool = False, desc: str = "timing") -> Timings:
    """Time every call the same way: ``warmup`` untimed calls each, then ``samples`` rounds of one timed call of
    each side in turn (so that a change of load hits all sides alike), recording each sample's wall time and the
    CPU that other processes used meanwhile (all CPU time of the machine minus this process's)."""
    if samples < 1 or warmup < 0:
        raise ValueError(f"interleaved: samples = {samples}, warmup = {warmup} are not valid; expected samples >= 1 "
                         "and warmup >= 0")
    for call in calls.values():
        for _ in range(warmup):
            call()
    sync(device)
    sides = {name: Timing([], []) for name in calls}
    busy_total, wall_total = 0.0, 0.0
    with tqdm(total=samples * len(calls), desc=desc, disable=not progress) as bar:
        for _ in range(samples):
            for name, call in calls.items():
                busy0, own0 = _busy_seconds(), time.process_time()
                start = time.perf_counter()
                call()
                sync(device)
                wall = time.perf_counter() - start
                own, busy1 = time.process_time() - own0, _busy_seconds()
                other = float("nan") if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - own)
                sides[name].samples.append(wall)
                sides[name].other_cores.append(other / wall if wall > 0 else float("nan"))
                busy_total, wall_total = busy_total + other, wall_total + wall
                bar.update(1)
    mean = busy_total / wall_total if wall_total > 0 else float("nan")
    known = not math.isnan(mean) and wall_total >= GUARD_MIN_SECONDS
    return Timings(sides, mean, bool(mean > NOISE_LIMIT_CORES) if known else None)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; ValueError for a CUDA request without a GPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device = {str(device)!r} is not valid; expected 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' was requested but torch.cuda.is_available() is False")
    return device


def random_batch(dims: Mapping[str, int], batch_size: int, device: str | torch.device = "cpu",
                 seed: int = 0) -> dict[str, Tensor]:
    """Aligned standard-normal rows {name: [batch_size, d]}."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch_size, d, generator=gen).to(device) for n, d in dims.items()}


def _pick_seed(n_models: int, i: int) -> int:
    """A seed whose first ``torch.randint(n_models)`` draw is ``i`` (the Trainer's model choice)."""
    for seed in range(100_000):
        if int(torch.randint(n_models, (1,), generator=torch.Generator().manual_seed(seed))) == i:
            return seed
    raise RuntimeError(f"no seed draws model {i} of {n_models}")


class OurStep:
    """``Trainer.train_step`` with the selected model forced to ``selected`` (re-seeding its generator)."""

    def __init__(self, dims: Mapping[str, int], n_latents: int, k: int, aux: str, device: torch.device,
                 selected: str, model: Any = None, dead_fraction: float = AUXK_DEAD_FRACTION, **train: Any) -> None:
        from usae.config import TrainConfig
        from usae.core.model import UniversalSAE
        from usae.train.trainer import Trainer

        self.model = model if model is not None else UniversalSAE(dict(dims), n_latents, k).to(device)
        train.setdefault("auxk_k", min(512, n_latents))
        cfg = TrainConfig(aux=aux, warmup_steps=0, **train)
        self.trainer = Trainer(self.model, cfg, progress=False)
        self.i = self.model.index(selected)
        self.seed = _pick_seed(len(self.model.names), self.i)
        self.dead = None
        if aux == "auxk":  # a fixed, seeded subset of the latents counts as dead before every step
            n_dead = max(1, round(dead_fraction * n_latents))
            chosen = torch.randperm(n_latents, generator=torch.Generator().manual_seed(0))[:n_dead]
            self.dead = torch.zeros(n_latents, dtype=torch.bool, device=device)
            self.dead[chosen.to(device)] = True

    def __call__(self, batch: Mapping[str, Tensor]) -> None:
        trainer = self.trainer
        trainer.generator.manual_seed(self.seed)
        if self.dead is not None:
            since = trainer.since_fire[self.i]
            since.zero_()
            since[self.dead] = trainer.config.dead_after_tokens
        got = trainer.train_step(batch)
        if got != self.i:
            raise RuntimeError(f"the trainer picked model {got}, expected {self.i}; its model choice changed")


def step_floor(dims: Mapping[str, int], selected: str, n_latents: int, k: int, batch_size: int,
               device: torch.device) -> Callable[[], None]:
    """What any sparse step of this shape must at least do, with our sparse kernels alone (the floor row):
    the selected encoder's forward GEMM ``X Wᵀ`` into a reused [B, m] buffer, then, for a random k-sparse
    code, the grouping of its entries by latent, the decode into every model, the gradient of the k values from
    every model, and the weight gradients of the selected decoder and encoder (segmented row sums). No TopK,
    no BatchNorm statistics, no optimizer, no loss: the gap between a step and this is their cost."""
    from usae.core.kernels.groups import group_by_latent
    from usae.core.kernels.torch_ops import gather_sum, row_pattern, sampled_dots, segment_rows

    gen = torch.Generator().manual_seed(0)
    x = {n: torch.randn(batch_size, d, generator=gen).to(device) for n, d in dims.items()}
    grads = {n: torch.randn(batch_size, d, generator=gen).to(device) for n, d in dims.items()}
    tables = {n: torch.randn(n_latents, d, generator=gen).to(device) for n, d in dims.items()}
    weight = torch.randn(n_latents, dims[selected], generator=gen).to(device)
    indices = torch.rand(batch_size, n_latents, generator=gen).topk(k, dim=1).indices.to(device)
    values = torch.rand(batch_size, k, generator=gen).to(device)
    buf = torch.empty(batch_size, n_latents, device=device)
    names = list(dims)

    def run() -> None:
        torch.mm(x[selected], weight.t(), out=buf)
        groups = group_by_latent(indices, n_latents)
        gather_sum(values, indices, [tables[n] for n in names])
        g = sampled_dots(row_pattern(indices, n_latents), [grads[n] for n in names], [tables[n] for n in names])
        segment_rows(groups.offsets, groups.tokens, groups.gather(values), grads[selected])
        segment_rows(groups.offsets, groups.tokens, groups.gather(g), x[selected])

    return run


# ---------------------------------------------------------------------------------------------- measurements
STEP_VARIANTS = ("ref_none", "ref_official", "ours_none", "ours_official", "ours_auxk", "ours_auxk_all", "floor")


def measure_steps(dims: Mapping[str, int] = PAPER_DIMS, n_latents: int = PAPER_LATENTS, k: int = PAPER_K,
                  batch_size: int = PAPER_BATCH, *, device: str | torch.device | None = "cpu",
                  selected: str | None = None, samples: int = 5, warmup: int = 2,
                  variants: Sequence[str] = STEP_VARIANTS, progress: bool = True) -> Timings:
    """Seconds per step of each variant, timed in one process on the same batch by ``interleaved``: every
    variant gets the same ``warmup`` steps on the full batch and ``samples`` timed steps in interleaved rounds.

    ``ref_*``: the official step (aux ``none``/``official``); ``ours_*``: ``Trainer.train_step`` (aux
    ``none``/``official``/``auxk``, ``auxk_all`` with every latent dead); ``floor``: ``step_floor``. The
    selected model is ``selected`` (default: the widest one) for every variant.
    """
    device = resolve_device(device)
    selected = selected or max(dims, key=lambda n: dims[n])
    i = list(dims).index(selected)
    batch = random_batch(dims, batch_size, device)
    calls: dict[str, Callable[[], object]] = {}
    for name in variants:
        torch.manual_seed(0)
        if name.startswith("ref_") and name[4:] in ("none", "official"):
            ref = OfficialReference(dims, n_latents, k, aux=name == "ref_official", device=device)
            calls[name] = lambda ref=ref: ref.step(batch, i)
        elif name.startswith("ours_") and name[5:] in ("none", "official", "auxk", "auxk_all"):
            if name == "ours_auxk_all":  # the worst case of AuxK: every latent dead
                ours = OurStep(dims, n_latents, k, "auxk", device, selected, dead_fraction=1.0)
            else:
                ours = OurStep(dims, n_latents, k, name[5:], device, selected)
            calls[name] = lambda ours=ours: ours(batch)
        elif name == "floor":
            calls[name] = step_floor(dims, selected, n_latents, k, batch_size, device)
        else:
            raise ValueError(f"variant {name!r} is not valid; expected one of {list(STEP_VARIANTS)}")
    return interleaved(calls, samples, warmup, device=device, progress=progress, desc="step timings")


def _write_store(path: Path, dims: Mapping[str, int], n_rows: int, tokens_per_image: int = 196) -> Any:
    from usae.data.standardisation import Standardisation
    from usae.data.store_writer import StoreWriter

    grid = int(round(tokens_per_image ** 0.5))
    n_images = -(-n_rows // (grid * grid))
    gen = torch.Generator().manual_seed(1)
    with StoreWriter(path, dict(dims), grid) as writer:
        writer.add_split("train", n_images)
        for name, d in dims.items():
            for row0 in range(0, n_images * grid * grid, 8192):
                n = min(8192, n_images * grid * grid - row0)
                writer.write("train", name, row0, torch.randn(n, d, generator=gen))
        return writer.finish({n: Standardisation.identity() for n in dims})


def fit_vs_step(dims: Mapping[str, int] = PAPER_DIMS, n_latents: int = PAPER_LATENTS, k: int = PAPER_K,
                batch_size: int = PAPER_BATCH, steps: int = 4, *, rounds: int = 2,
                device: str | torch.device | None = "cpu", aux: str = "none") -> dict[str, float]:
    """Tokens/s of ``Trainer.fit`` over an on-disk float16 store of ``steps`` batches (reading, shuffling,
    conversion, monitoring and logging included) and of bare ``train_step`` calls on in-memory batches with
    the same seed, hence the same model picks. Every run starts from the same initial weights with a fresh
    Trainer; the two are timed alternately ``rounds`` times and the best of each is kept (on a shared machine
    the best run is the one least disturbed by other work)."""
    from usae.config import TrainConfig
    from usae.core.model import UniversalSAE
    from usae.train.trainer import Trainer

    device = resolve_device(device)
    torch.manual_seed(0)
    init = UniversalSAE(dict(dims), n_latents, k).to(device)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, aux=aux, warmup_steps=0, log_every=max(steps, 1))
    batches = [random_batch(dims, batch_size, device, seed=s) for s in range(2)]
    Trainer(copy.deepcopy(init), cfg, progress=False).train_step(batches[0])
    best = {"fit": math.inf, "step": math.inf}
    with tempfile.TemporaryDirectory(prefix="usae-bench-store-") as tmp:
        store = _write_store(Path(tmp) / "store", dims, steps * batch_size)
        for _ in range(rounds):
            bare = Trainer(copy.deepcopy(init), cfg, progress=False)
            sync(device)
            start = time.perf_counter()
            picks = [bare.train_step(batches[s % 2]) for s in range(steps)]
            sync(device)
            best["step"] = min(best["step"], time.perf_counter() - start)
            trainer = Trainer(copy.deepcopy(init), cfg, progress=False)
            start = time.perf_counter()
            trainer.fit(store)
            sync(device)
            best["fit"] = min(best["fit"], time.perf_counter() - start)
            if list(trainer.history.model) != picks:
                raise RuntimeError("fit and the bare steps picked different models; the comparison is not paired")
            del bare, trainer
    tokens = steps * batch_size
    return {"fit_tokens_per_s": tokens / best["fit"], "step_tokens_per_s": tokens / best["step"], "steps": steps}
