"""Benchmark of the USAE training step against the official one (``usae bench`` entry ``"step"``).

The reference is the official code's step, ``usae.perf.reference.OfficialReference``.

Ours is whatever ``usae.train.trainer.Trainer(...).train_step`` does, timed through the public API. Both are timed
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
and sweeps m from 6144 to 65536. ``usae bench step [--quick] [--device cpu|cuda]`` runs this entry alone
(and writes the JSON like ``make bench``); ``make bench`` picks CUDA when one is available (``--device`` or
``USAE_BENCH_DEVICE`` overrides).

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
    for the step benchmark with few repetitions, the sweep around B = 784 (a few minutes on 2 CPU cores).
    ``paper``: as ``book`` with the bench's repetitions and the sweep around B = 6272.
    """
    if preset == "smoke":
        return {"dims": {"a": 32, "b": 64, "c": 64}, "n_latents": 512, "k": 8, "batch_size": 256, "repeats": 1,
                "reference_repeats": 1, "fit_steps": 2, "sweep_batch": 128, "batch_sizes": (64, 128, 256),
                "latents": (256, 512, 1024), "n_models": (1, 2, 3, 4)}
    if preset in ("book", "paper"):
        paper = preset == "paper"
        base = PAPER_BATCH if paper else PAPER_BATCH // 8
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


def step_entry(quick: bool) -> list[Row]:
    return bench_step(quick, os.environ.get("USAE_BENCH_DEVICE", "auto"), progress=True)
