"""Benchmark of the USAE training step against the official one (``make bench`` entry ``"step"``).

The reference is the official code's step, ``usae.official_step.OfficialReference``.

Ours is whatever ``usae.train.Trainer(...).train_step`` does, timed through the public API. Both are timed
in the same process at the paper's shape (M = 3 models of widths 384/768/768, m = 6144, k = 32, B = 6272
tokens), median of several repetitions after warm-up. The selected model is fixed to a 768-wide one
(``siglip``): the widest encoder, where our step is slowest relative to the reference, so the ratios are
the conservative ones.

Rows (ratios read "ours is this many times better"):

1. same loss without the auxiliary term: ours vs reference, target 5;
2. the official auxiliary loss in both: target 2;
3. ours with Gao et al. AuxK (k_aux = 512, 10 % of the latents dead) against the reference with the official
   auxiliary loss: target 10; the worst case (every latent dead) is reported too, held to target 2;
4. our step (no aux) against the dense encoder GEMMs alone (``X Wᵀ`` then ``Gᵀ X``): at most 1.3x, i.e.
   ratio GEMM / step >= 1/1.3;
5. tokens/s of ``Trainer.fit`` over an on-disk ``ActivationStore`` (data loading included, no aux, random
   model choice) against the bare ``train_step`` over the same picks from memory: within 15 %.

``--quick`` uses B = 1568 tokens (8 images) and fewer repetitions. On CUDA the entry also reports tokens/s
and sweeps m from 6144 to 65536. ``python -m usae.bench_step [--quick] [--device cpu|cuda]`` runs this
entry alone (and writes the JSON like ``make bench``); ``make bench`` picks CUDA when one is available
(``USAE_BENCH_DEVICE`` overrides).

For the performance chapter (with ``usae.step_anatomy``'s ``step_flops`` and ``time_parts``):
``scaling_sweep`` (time vs B, m, M), ``chapter_settings`` and ``device_info``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from usae.official_step import OfficialReference

PAPER_DIMS: dict[str, int] = {"dinov2": 384, "siglip": 768, "vit": 768}
PAPER_LATENTS, PAPER_K, PAPER_BATCH = 6144, 32, 6272
# AuxK's cost grows with the number of dead latents. The timed setting marks 10 % dead (614 of 6144, more
# than k_aux = 512, so every token still decodes its full k_aux); ``ours_auxk_all`` (every latent dead) is
# the worst case, reported beside it.
AUXK_DEAD_FRACTION = 0.10
Row = dict[str, object]


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                device: str | torch.device = "cpu") -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (synchronising on CUDA)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def _warmup_batch(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
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
        from usae.model import UniversalSAE
        from usae.train import Trainer

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
    small = _warmup_batch(batch, device)
    ref_repeats = reference_repeats or repeats
    calls: dict[str, Callable[[], object]] = {}
    for name in variants:
        torch.manual_seed(0)
        if name.startswith("ref_") and name[4:] in ("none", "official"):
            ref = OfficialReference(dims, n_latents, k, aux=name == "ref_official", device=device)
            for _ in range(warmup):
                ref.step(small, i)
            calls[name] = lambda ref=ref: ref.step(batch, i)
        elif name == "ours_auxk_all":
            ours = OurStep(dims, n_latents, k, "auxk", device, selected, dead_fraction=1.0)
        elif name.startswith("ours_") and name[5:] in ("none", "official", "auxk"):
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
                    _sync(device)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    call()
                    _sync(device)
                    samples[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
                    bar.update(1)
    if record is not None:
        record.update({"load_before": load_before, "load_after": os.getloadavg()[0],
                       "fastest": {n: min(v) for n, v in samples.items()},
                       "cpu_median": {n: statistics.median(v) for n, v in cpu.items()}})
    return {name: statistics.median(v) for name, v in samples.items()}


def _write_store(path: Path, dims: Mapping[str, int], n_rows: int, tokens_per_image: int = 196) -> Any:
    from usae.standardisation import Standardisation
    from usae.store_writer import StoreWriter

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
    from usae.model import UniversalSAE
    from usae.train import Trainer

    device = resolve_device(device)
    torch.manual_seed(0)
    init = UniversalSAE(dict(dims), n_latents, k).to(device)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, aux=aux, warmup_steps=0, log_every=max(steps, 1))
    batches = [random_batch(dims, batch_size, device, seed=s) for s in range(2)]
    Trainer(copy.deepcopy(init), cfg, progress=False).train_step(_warmup_batch(batches[0], device))
    best = {"fit": math.inf, "step": math.inf}
    with tempfile.TemporaryDirectory(prefix="usae-bench-store-") as tmp:
        store = _write_store(Path(tmp) / "store", dims, steps * batch_size)
        for _ in range(rounds):
            bare = Trainer(copy.deepcopy(init), cfg, progress=False)
            _sync(device)
            start = time.perf_counter()
            picks = [bare.train_step(batches[s % 2]) for s in range(steps)]
            _sync(device)
            best["step"] = min(best["step"], time.perf_counter() - start)
            trainer = Trainer(copy.deepcopy(init), cfg, progress=False)
            start = time.perf_counter()
            trainer.fit(store)
            _sync(device)
            best["fit"] = min(best["fit"], time.perf_counter() - start)
            if list(trainer.history["model"]) != picks:
                raise RuntimeError("fit and the bare steps picked different models; the comparison is not paired")
            del bare, trainer
    tokens = steps * batch_size
    return {"fit_tokens_per_s": tokens / best["fit"], "step_tokens_per_s": tokens / best["step"], "steps": steps}


# ---------------------------------------------------------------------------------------------- scaling
def _models(n_models: int, dims: Mapping[str, int]) -> dict[str, int]:
    """``n_models`` models: the widest of ``dims`` first, then the others, cycled with suffixes."""
    order = sorted(dims, key=lambda n: -dims[n])
    order = [order[0]] + [n for n in dims if n != order[0]]
    return {(n if r == 0 else f"{n}_{r + 1}"): dims[n]
            for j in range(n_models) for r, n in [(j // len(order), order[j % len(order)])]}


def scaling_sweep(dims: Mapping[str, int] = PAPER_DIMS, n_latents: int = PAPER_LATENTS, k: int = PAPER_K,
                  batch_size: int = PAPER_BATCH, *, batch_sizes: Sequence[int] = (), latents: Sequence[int] = (),
                  n_models: Sequence[int] = (), aux: str = "none", device: str | torch.device | None = "cpu",
                  repeats: int = 2, warmup: int = 1, progress: bool = True) -> list[dict[str, Any]]:
    """Step time of the reference and ours while one of B, m, M varies around (``batch_size``,
    ``n_latents``, ``len(dims)``) -> rows {vary, value, impl, seconds}: the fastest of ``repeats`` interleaved
    runs (on a shared machine, the run least disturbed by other work). ``aux``: ``"none"`` or ``"official"``
    (the same term in both). The selected model is the widest; extra models repeat the widths of ``dims``."""
    if aux not in ("none", "official"):
        raise ValueError(f"aux = {aux!r} is not valid; expected 'none' or 'official'")
    points = [("B", b, dims, n_latents, b) for b in batch_sizes] + \
             [("m", m, dims, m, batch_size) for m in latents] + \
             [("M", n, _models(n, dims), n_latents, batch_size) for n in n_models]
    cache: dict[tuple, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    for vary, value, ds, m, b in tqdm(points, desc="scaling sweep", disable=not progress):
        key = (tuple(ds.items()), m, b)
        if key not in cache:
            record: dict[str, Any] = {}
            measure_steps(ds, m, k, b, device=device, selected=next(iter(_models(1, ds))), repeats=repeats,
                          warmup=warmup, variants=(f"ref_{aux}", f"ours_{aux}"), progress=False, record=record)
            cache[key] = record["fastest"]
        rows += [{"vary": vary, "value": value, "impl": impl, "seconds": cache[key][f"{tag}_{aux}"]}
                 for impl, tag in (("reference", "ref"), ("ours", "ours"))]
    return rows


def sweep_growth(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each (vary, impl) of a ``scaling_sweep``: how much the step time grows from the smallest to the
    largest value -> rows {vary, impl, from, to, size x, time x, added seconds}."""
    out = []
    for vary in dict.fromkeys(r["vary"] for r in rows):
        for impl in ("reference", "ours"):
            pts = sorted((r["value"], r["seconds"]) for r in rows if r["vary"] == vary and r["impl"] == impl)
            if len(pts) >= 2:
                (v0, t0), (v1, t1) = pts[0], pts[-1]
                out.append({"vary": vary, "impl": impl, "from": v0, "to": v1, "size x": v1 / v0, "time x": t1 / t0,
                            "added seconds": t1 - t0})
    return out


# ---------------------------------------------------------------------------------------------- bench rows
def step_rows(times: Mapping[str, float], fit: Mapping[str, float] | None, shape: str) -> list[Row]:
    """The entry's five rows from ``measure_steps`` times and a ``fit_vs_step`` result."""
    from usae.bench import row

    rows = [
        row("step", f"no aux: ours vs official ({shape})", times["ours_none"], times["ref_none"], "s",
            times["ref_none"] / times["ours_none"], 5.0),
        row("step", f"official aux: ours vs official ({shape})", times["ours_official"], times["ref_official"], "s",
            times["ref_official"] / times["ours_official"], 2.0),
        row("step", f"ours AuxK-512, 10% dead, vs official+aux ({shape})", times["ours_auxk"], times["ref_official"],
            "s", times["ref_official"] / times["ours_auxk"], 10.0),
        row("step", f"no-aux step vs enc fwd+wgrad GEMM ({shape})", times["ours_none"], times["gemm"], "s",
            times["gemm"] / times["ours_none"], 1 / 1.3),
    ]
    if "ours_auxk_all" in times:  # worst case: every latent dead; held to the official-aux row's target
        rows.append(row("step", f"ours AuxK-512, all dead, vs official+aux ({shape})", times["ours_auxk_all"],
                        times["ref_official"], "s", times["ref_official"] / times["ours_auxk_all"], 2.0))
    if fit is not None:
        rows.append(row("step", f"Trainer.fit on store vs bare step ({shape})", fit["fit_tokens_per_s"],
                        fit["step_tokens_per_s"], "tok/s", fit["fit_tokens_per_s"] / fit["step_tokens_per_s"], 0.85))
    return rows


def bench_step(quick: bool = False, device: str | torch.device | None = None, *,
               dims: Mapping[str, int] = PAPER_DIMS, n_latents: int = PAPER_LATENTS, k: int = PAPER_K,
               batch_size: int | None = None, repeats: int | None = None, fit_steps: int | None = None,
               latents_sweep: Sequence[int] | None = None, progress: bool = False) -> list[Row]:
    """All rows of the ``step`` entry. ``quick``: B = 1568 (8 images), 2 repetitions, 3 fit steps; full:
    B = 6272, 5 repetitions of ours and 3 of the reference, 4 fit steps (each fit timed twice). On CUDA also
    tokens/s rows and a sweep over ``latents_sweep`` (default 6144 ... 65536)."""
    device = resolve_device(device)
    b = batch_size or (PAPER_BATCH // 4 if quick else PAPER_BATCH)
    reps = repeats or (2 if quick else 5)
    shape = f"B={b}, m={n_latents}, M={len(dims)}, {device.type}"
    evidence: dict[str, Any] = {}
    times = measure_steps(dims, n_latents, k, b, device=device, repeats=reps,
                          reference_repeats=repeats or (2 if quick else 3), progress=progress, record=evidence)
    fit = fit_vs_step(dims, n_latents, k, b, fit_steps or (3 if quick else 4), device=device)
    rows = step_rows(times, fit, shape)
    for r in rows:
        r["detail"] = {"selected": max(dims, key=lambda n: dims[n]), "dims": dict(dims), "k": k,
                       "repeats": reps, "times": dict(times), "fit": fit, "machine": evidence}
    if device.type == "cuda":
        from usae.bench import row

        for tag in ("none", "official"):
            rows.append(row("step", f"tokens/s, {tag} aux ({shape})", b / times[f"ours_{tag}"],
                            b / times[f"ref_{tag}"], "tok/s", times[f"ref_{tag}"] / times[f"ours_{tag}"], None))
        sweep = scaling_sweep(dims, n_latents, k, b, latents=latents_sweep or (6144, 12288, 24576, 49152, 65536),
                              aux="official", device=device, repeats=reps, progress=progress)
        for m in sorted({r["value"] for r in sweep}):
            t = {r["impl"]: r["seconds"] for r in sweep if r["value"] == m}
            rows.append(row("step", f"m={m}, official aux, B={b}, cuda", t["ours"], t["reference"], "s",
                            t["reference"] / t["ours"], None))
    return rows


# ---------------------------------------------------------------------------------------------- the chapter
def chapter_settings(preset: str) -> dict[str, Any]:
    """Shapes and repetitions of the performance chapter for a preset.

    ``smoke``: tiny shapes, one repetition (seconds; speed-ups need not show). ``book``: the paper's shape
    for the step benchmark with few repetitions, the sweep around B = 1568 (a few minutes on 2 CPU cores).
    ``paper``: as ``book`` with the bench's repetitions and the sweep around B = 6272.
    """
    if preset == "smoke":
        return {"dims": {"a": 32, "b": 64, "c": 64}, "n_latents": 512, "k": 8, "batch_size": 256, "repeats": 1,
                "reference_repeats": 1, "fit_steps": 2, "sweep_batch": 128, "batch_sizes": (64, 128, 256),
                "latents": (256, 512, 1024), "n_models": (1, 2, 3, 4)}
    if preset in ("book", "paper"):
        paper = preset == "paper"
        base = PAPER_BATCH if paper else PAPER_BATCH // 4
        return {"dims": dict(PAPER_DIMS), "n_latents": PAPER_LATENTS, "k": PAPER_K, "batch_size": PAPER_BATCH,
                "repeats": 5 if paper else 2, "reference_repeats": 3 if paper else 1, "fit_steps": 4 if paper else 3,
                "sweep_batch": base, "batch_sizes": (base // 2, base, base * 2),
                "latents": (3072, 6144, 12288), "n_models": (1, 2, 3, 4)}
    raise ValueError(f"preset = {preset!r} is not valid; expected 'smoke', 'book' or 'paper'")


def device_info() -> dict[str, Any]:
    """The machine the numbers come from: CPU model, cores, torch threads, CUDA availability and device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda available": cuda, "cuda device": torch.cuda.get_device_name() if cuda else None}


def _register() -> None:
    from usae.bench import entry

    @entry("step")
    def step_entry(quick: bool) -> list[Row]:
        return bench_step(quick, os.environ.get("USAE_BENCH_DEVICE", "auto"), progress=True)


_register()  # usae.bench imports this module to collect its entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usae.bench_step", description="USAE training-step benchmark")
    parser.add_argument("--quick", action="store_true", help="B = 1568 tokens, fewer repetitions")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    resolve_device(args.device)  # fail early on a CUDA request without a GPU
    os.environ["USAE_BENCH_DEVICE"] = args.device
    from usae.bench import format_table, run

    rows = run(["step"], quick=args.quick)
    print(format_table(rows))
    return 1 if any(r["passed"] is False for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
