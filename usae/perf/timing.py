"""Timing one USAE training step: ours (``Trainer.train_step``) against the official step
(``usae.perf.reference``) and the encoder's dense GEMMs, at the paper's shape, in one process.

``measure_steps`` times every variant in interleaved rounds (medians, fastest runs, CPU times, machine load);
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


def warmup_batch(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """What the reference's warm-up steps run on: on CPU the first 512 rows (it creates the AdamW state and
    the threads as well as a full batch would, for a fraction of the time: the reference keeps no buffer that
    depends on B); on CUDA the full batch (kernel selection depends on the shapes). Our step warms up on the
    full batch everywhere: the trainer keeps a [B, m] workspace that the first full-size step allocates."""
    return dict(batch) if device.type == "cuda" else {n: x[:512] for n, x in batch.items()}


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


def encoder_gemm(batch_size: int, dim: int, n_latents: int, device: torch.device) -> Callable[[], None]:
    """The dense GEMMs every step needs at least: ``X Wᵀ`` [B, m] then the weight gradient ``Gᵀ X`` [m, d]."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, dim, generator=gen).to(device)
    w = torch.randn(n_latents, dim, generator=gen).to(device)
    g = torch.randn(batch_size, n_latents, generator=gen).to(device)

    def run() -> None:
        x @ w.t()
        g.t() @ x

    return run


# ---------------------------------------------------------------------------------------------- measurements
def measure_steps(dims: Mapping[str, int] = PAPER_DIMS, n_latents: int = PAPER_LATENTS, k: int = PAPER_K,
                  batch_size: int = PAPER_BATCH, *, device: str | torch.device | None = "cpu",
                  selected: str | None = None, repeats: int = 3, reference_repeats: int | None = None,
                  warmup: int = 1, variants: Sequence[str] = ("ref_none", "ref_official", "ours_none",
                                                              "ours_official", "ours_auxk", "ours_auxk_all",
                                                              "gemm"),
                  progress: bool = True, record: dict[str, Any] | None = None) -> dict[str, float]:
    """Median seconds per step of each variant, timed in one process on the same batch.

    ``ref_*``: the official step (aux ``none``/``official``); ``ours_*``: ``Trainer.train_step`` (aux
    ``none``/``official``/``auxk``); ``gemm``: the encoder's forward and weight-gradient GEMMs alone. The
    selected model is ``selected`` (default: the widest one) for every variant. All variants are built and
    warmed up first, then timed in interleaved rounds (one call of each per round), so that a change in the
    load of a shared machine affects them alike; the reference variants take part in the first
    ``reference_repeats`` rounds only. ``record`` (a dict) receives the evidence of how busy the machine was:
    the 1-minute load average before and after, and per variant the fastest wall time and the median process
    CPU time (all threads; below the wall time x threads when other work held the cores).
    """
    device = resolve_device(device)
    selected = selected or max(dims, key=lambda n: dims[n])
    i = list(dims).index(selected)
    batch = random_batch(dims, batch_size, device)
    small = warmup_batch(batch, device)
    ref_repeats = reference_repeats or repeats
    calls: dict[str, Callable[[], object]] = {}
    for name in variants:
        torch.manual_seed(0)
        if name.startswith("ref_") and name[4:] in ("none", "official"):
            ref = OfficialReference(dims, n_latents, k, aux=name == "ref_official", device=device)
            for _ in range(warmup):
                ref.step(small, i)
            calls[name] = lambda ref=ref: ref.step(batch, i)
        elif name.startswith("ours_") and name[5:] in ("none", "official", "auxk", "auxk_all"):
            if name == "ours_auxk_all":  # the worst case of AuxK: every latent dead
                ours = OurStep(dims, n_latents, k, "auxk", device, selected, dead_fraction=1.0)
            else:
                ours = OurStep(dims, n_latents, k, name[5:], device, selected)
            for _ in range(warmup):
                ours(batch)
            calls[name] = lambda ours=ours: ours(batch)
        elif name == "gemm":
            calls[name] = encoder_gemm(batch_size, dims[selected], n_latents, device)
            for _ in range(warmup):
                calls[name]()
        else:
            raise ValueError(f"variant {name!r} is not valid; expected ref_none, ref_official, ours_none, "
                             "ours_official, ours_auxk, ours_auxk_all or gemm")
    samples: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    load_before = os.getloadavg()[0]
    rounds = max(repeats, ref_repeats if any(n.startswith("ref_") for n in calls) else 0)
    with tqdm(total=sum(ref_repeats if n.startswith("ref_") else repeats for n in calls), desc="step timings",
              disable=not progress) as bar:
        for r in range(rounds):
            for name, call in calls.items():
                if r < (ref_repeats if name.startswith("ref_") else repeats):
                    sync(device)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    call()
                    sync(device)
                    samples[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
                    bar.update(1)
    if record is not None:
        record.update({"load_before": load_before, "load_after": os.getloadavg()[0],
                       "fastest": {n: min(v) for n, v in samples.items()},
                       "cpu_median": {n: statistics.median(v) for n, v in cpu.items()}})
    return {name: statistics.median(v) for name, v in samples.items()}


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
    Trainer(copy.deepcopy(init), cfg, progress=False).train_step(warmup_batch(batches[0], device))
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
