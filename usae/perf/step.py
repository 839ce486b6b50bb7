"""Benchmark of the USAE training step against the official one (``usae bench`` entry ``"step"``).

The reference is the official code's step, ``usae.perf.reference.OfficialReference``.

Ours is whatever ``usae.train.trainer.Trainer(...).train_step`` does, timed through the public API. Every
variant is built in one process at the paper's shape (M = 3 models of widths 384/768/768, m = 6144, k = 32,
B = 6272 tokens) and timed by ``usae.perf.timing.interleaved``: two warm-up steps each on the full batch, then
``samples`` (>= 5) interleaved timed steps of every variant; each row carries the median, the spread (fastest,
slowest), the number of samples and the quiet-machine guard (a row taken while other processes used more than
0.2 cores is marked noisy, not a result). The selected model is fixed to a 768-wide one (``siglip``): the
widest encoder, where our step is slowest relative to the reference, so the ratios are the conservative ones.

Rows (ratios read "ours is this many times better"):

1. same loss without the auxiliary term: ours vs reference, target 5;
2. the official auxiliary loss in both: target 2;
3. ours with Gao et al. AuxK (k_aux = 512, 10 % of the latents dead) against the reference with the official
   auxiliary loss: target 10; the worst case (every latent dead) is timed and reported too, held to target 2;
4. the floor (``usae.perf.timing.step_floor``: the forward GEMM ``X Wᵀ`` into a reused buffer plus our sparse
   kernels' own work for a random k-sparse code, no TopK, no BatchNorm, no optimizer) against our no-aux step:
   the step should cost at most 1.3x the floor, i.e. ratio floor / step >= 1/1.3;
5. tokens/s of ``Trainer.fit`` over an on-disk ``ActivationStore`` (data loading included, no aux, random
   model choice) against the bare ``train_step`` over the same picks from memory: within 15 %.

``--quick`` uses B = 1568 tokens (8 images) and fewer fit steps. On CUDA the entry also reports tokens/s
and sweeps m from 6144 to 65536. ``usae bench step [--quick] [--device cpu|cuda]`` runs this entry alone
(and writes the JSON like ``make bench``); ``make bench`` picks CUDA when one is available (``--device`` or
``USAE_BENCH_DEVICE`` overrides). Single-model comparisons with other TopK SAE libraries are the ``peers``
entry (``usae.perf.peers``).

For the performance chapter (with ``usae.perf.anatomy``'s ``step_flops`` and ``time_parts``):
``scaling_sweep`` (time vs B, m, M), ``chapter_settings`` and ``device_info``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from usae.perf.rows import Row, row
from usae.perf.timing import (
    PAPER_BATCH,
    PAPER_DIMS,
    PAPER_K,
    PAPER_LATENTS,
    Timings,
    fit_vs_step,
    measure_steps,
    resolve_device,
)


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
            got = measure_steps(ds, m, k, b, device=device, selected=next(iter(_models(1, ds))), samples=repeats,
                                warmup=warmup, variants=(f"ref_{aux}", f"ours_{aux}"), progress=False)
            cache[key] = {name: t.spread[0] for name, t in got.sides.items()}
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
def step_rows(times: Timings, fit: Mapping[str, float] | None, shape: str) -> list[Row]:
    """The entry's rows from a ``measure_steps`` result (median, spread, samples and the noise guard in each
    row) and a ``fit_vs_step`` result."""

    def pair(what: str, ours: str, ref: str, target: float | None) -> Row:
        a, b = times.sides[ours], times.sides[ref]
        return row("step", what, a.median, b.median, "s", b.median / a.median, target, ours_spread=a.spread,
                   reference_spread=b.spread, samples=min(len(a.samples), len(b.samples)), noisy=times.noisy)

    rows = [
        pair(f"no aux: ours vs official ({shape})", "ours_none", "ref_none", 5.0),
        pair(f"official aux: ours vs official ({shape})", "ours_official", "ref_official", 2.0),
        pair(f"ours AuxK-512, 10% dead, vs official+aux ({shape})", "ours_auxk", "ref_official", 10.0),
        # floor / step >= 1/1.3: the step costs at most 1.3x the forward GEMM plus our sparse kernels alone
        pair(f"floor (fwd GEMM + sparse kernels) / no-aux step ({shape})", "ours_none", "floor", 1 / 1.3),
    ]
    if "ours_auxk_all" in times.sides:  # worst case: every latent dead; held to the official-aux row's target
        rows.insert(3, pair(f"ours AuxK-512, all dead, vs official+aux ({shape})", "ours_auxk_all", "ref_official",
                            2.0))
    if fit is not None:
        rows.append(row("step", f"Trainer.fit on store vs bare step ({shape})", fit["fit_tokens_per_s"],
                        fit["step_tokens_per_s"], "tok/s", fit["fit_tokens_per_s"] / fit["step_tokens_per_s"], 0.85,
                        noisy=times.noisy))
    return rows


def tokens_rows(times: Timings, batch_size: int, shape: str) -> list[Row]:
    """Tokens/s of ours and of the official step, without and with the official aux, from ``measure_steps``."""
    med = times.medians()
    return [row("step", f"tokens/s, {tag} aux ({shape})", batch_size / med[f"ours_{tag}"],
                batch_size / med[f"ref_{tag}"], "tok/s", med[f"ref_{tag}"] / med[f"ours_{tag}"], None,
                noisy=times.noisy) for tag in ("none", "official")]


def latents_rows(dims: Mapping[str, int], n_latents: int, k: int, batch_size: int, latents: Sequence[int],
                 device: torch.device, samples: int, progress: bool = False) -> list[Row]:
    """One row per width in ``latents``: our step against the official one, both with the official aux (the
    fastest of ``samples`` interleaved runs, ``scaling_sweep``)."""
    sweep = scaling_sweep(dims, n_latents, k, batch_size, latents=latents, aux="official", device=device,
                          repeats=samples, progress=progress)
    rows = []
    for m in sorted({r["value"] for r in sweep}):
        t = {r["impl"]: r["seconds"] for r in sweep if r["value"] == m}
        rows.append(row("step", f"m={m}, official aux, B={batch_size}, {device.type} (fastest of {samples})",
                        t["ours"], t["reference"], "s", t["reference"] / t["ours"], None))
    return rows


def bench_step(quick: bool = False, device: str | torch.device | None = None, *,
               dims: Mapping[str, int] = PAPER_DIMS, n_latents: int = PAPER_LATENTS, k: int = PAPER_K,
               batch_size: int | None = None, samples: int = 5, fit_steps: int | None = None,
               latents_sweep: Sequence[int] | None = None, progress: bool = False) -> list[Row]:
    """All rows of the ``step`` entry: every variant warmed up twice on the full batch, then ``samples`` (>= 5)
    interleaved timed steps. ``quick``: B = 1568 (8 images) and 3 fit steps; full: B = 6272 and 4 fit steps
    (each fit timed twice). On CUDA also tokens/s rows and a sweep over ``latents_sweep`` (default 6144 ...
    65536)."""
    device = resolve_device(device)
    b = batch_size or (PAPER_BATCH // 4 if quick else PAPER_BATCH)
    shape = f"B={b}, m={n_latents}, M={len(dims)}, {device.type}"
    times = measure_steps(dims, n_latents, k, b, device=device, samples=samples, progress=progress)
    fit = fit_vs_step(dims, n_latents, k, b, fit_steps or (3 if quick else 4), device=device)
    rows = step_rows(times, fit, shape)
    for r in rows:
        r["detail"] = {"selected": max(dims, key=lambda n: dims[n]), "dims": dict(dims), "k": k,
                       "samples": {n: t.samples for n, t in times.sides.items()}, "fit": fit,
                       "other_cores": times.other_cores}
    if device.type == "cuda":
        rows += tokens_rows(times, b, shape)
        rows += latents_rows(dims, n_latents, k, b, latents_sweep or (6144, 12288, 24576, 49152, 65536), device,
                             samples, progress)
    return rows


# ---------------------------------------------------------------------------------------------- the chapter
def chapter_settings(preset: str) -> dict[str, Any]:
    """Shapes and repetitions of the performance chapter for a preset.

    Every preset times 5 interleaved samples of every side (``samples``) after the same ``warmup`` steps for
    every side (1; 2 at ``paper``, as ``make bench``). ``smoke``: tiny shapes (seconds;
    speed-ups need not show). ``book``: the paper's models, m and k with a quarter of its batch (B = 1568, 8 images)
    for the step benchmark, an eighth (B = 784) for the peers (without the memory probe), the sweep around
    B = 392 (about two minutes on 2 CPU cores). ``paper``: B = 6272 everywhere, the peers with memory.
    """
    if preset == "smoke":
        return {"dims": {"a": 32, "b": 64, "c": 64}, "n_latents": 512, "k": 8, "batch_size": 256, "samples": 5,
                "warmup": 1,
                "fit_steps": 2, "sweep_batch": 128, "batch_sizes": (64, 128, 256),
                "latents": (256, 512, 1024), "n_models": (1, 2, 3, 4),
                "peer_dim": 64, "peer_widths": (512, 2048), "peer_batch": 256, "peer_memory": False}
    if preset in ("book", "paper"):
        paper = preset == "paper"
        base = PAPER_BATCH if paper else PAPER_BATCH // 16
        return {"dims": dict(PAPER_DIMS), "n_latents": PAPER_LATENTS, "k": PAPER_K,
                "batch_size": PAPER_BATCH if paper else PAPER_BATCH // 4,
                "samples": 5, "warmup": 2 if paper else 1, "fit_steps": 4 if paper else 3,
                "sweep_batch": base, "batch_sizes": (base // 2, base, base * 2),
                "latents": (3072, 6144, 12288), "n_models": (1, 2, 3, 4),
                "peer_dim": 768, "peer_widths": (6144, 24576), "peer_batch": PAPER_BATCH if paper else PAPER_BATCH // 8,
                "peer_memory": paper}
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


def step_entry(quick: bool) -> list[Row]:
    return bench_step(quick, os.environ.get("USAE_BENCH_DEVICE", "auto"), progress=True)
