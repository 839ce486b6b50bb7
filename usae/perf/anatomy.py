"""Anatomy of one training step: operation counts per part and a profiled step split by kind of work.

``step_flops`` counts the floating-point operations of each part of the reference (official) step and of ours;
``time_parts`` profiles one step of each and groups the profiler's events into ``PART_KINDS``. Used by the
performance chapter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from usae.perf.reference import OfficialReference
from usae.perf.timing import (
    PAPER_BATCH,
    PAPER_DIMS,
    PAPER_K,
    PAPER_LATENTS,
    OurStep,
    median_time,
    random_batch,
    resolve_device,
    sync,
)

# ---------------------------------------------------------------------------------------------- parts of a step
PART_KINDS = ("dense GEMM, forward", "dense GEMM, backward", "TopK / sort", "gather, scatter, sparse",
              "elementwise, reductions, copies", "optimizer (clip + AdamW)", "other (Python, autograd)")
_GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_addmm_activation"}
_SELECT = ("topk", "sort", "kthvalue")
_SPARSE = ("embedding_bag", "index", "gather", "scatter", "sampled_addmm", "sparse", "nonzero", "bincount",
           "masked_select", "take", "segment", "searchsorted")


def _part_of(event: Any) -> str | None:
    """The kind of work of one profiler event (by its name and its enclosing ranges)."""
    name, parent, backward = event.name, event.cpu_parent, False
    while parent is not None:
        if parent.name.startswith("Optimizer.step") or parent.name.startswith("clip_grad"):
            return "optimizer (clip + AdamW)"
        backward = backward or parent.name.startswith("autograd::engine::evaluate_function")
        parent = parent.cpu_parent
    if name.startswith("Optimizer.step"):
        return "optimizer (clip + AdamW)"
    if not name.startswith("aten::"):
        return "other (Python, autograd)"
    if name in _GEMM:
        return "dense GEMM, backward" if backward else "dense GEMM, forward"
    op = name[len("aten::"):]
    if any(key in op for key in _SELECT):
        return "TopK / sort"
    if any(key in op for key in _SPARSE):
        return "gather, scatter, sparse"
    return "elementwise, reductions, copies"


def profile_parts(step: Callable[[], object], device: str | torch.device = "cpu") -> dict[str, float]:
    """Seconds of one call of ``step()`` by kind of work (``PART_KINDS``), from the PyTorch profiler.

    Each operator's own time (its children excluded) is assigned to a kind by its name: dense matrix products
    (forward, or inside the autograd backward), TopK and sorts, gathers/scatters/sparse products, everything
    else elementwise; anything inside ``Optimizer.step`` or a ``clip_grad`` range is the optimizer. On CUDA
    the device time of each operator is used. The profiler adds some overhead; compare kinds, not totals.
    """
    device = torch.device(device)
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" line on a machine without GPU
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    out = dict.fromkeys(PART_KINDS, 0.0)
    for event in prof.events():
        seconds = (getattr(event, "self_device_time_total", 0.0) if device.type == "cuda"
                   else event.self_cpu_time_total) / 1e6
        part = _part_of(event)
        if part is not None and seconds > 0:
            out[part] += seconds
    return out


class _ClippedOptimizerStep:
    """Wraps ``torch.nn.utils.clip_grad_norm_`` in a profiler range while a step runs (clipping is no
    ``Optimizer.step`` of its own)."""

    def __enter__(self) -> None:
        self.original = torch.nn.utils.clip_grad_norm_

        def clip(*args: Any, **kwargs: Any) -> Tensor:
            with torch.profiler.record_function("clip_grad_norm_"):
                return self.original(*args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = clip

    def __exit__(self, *exc: Any) -> None:
        torch.nn.utils.clip_grad_norm_ = self.original


def time_parts(dims: Mapping[str, int] = PAPER_DIMS, n_latents: int = PAPER_LATENTS, k: int = PAPER_K,
               batch_size: int = PAPER_BATCH, *, aux: str = "official", device: str | torch.device | None = "cpu",
               selected: str | None = None, step_seconds: Mapping[str, float] | None = None,
               progress: bool = True) -> list[dict[str, Any]]:
    """Where the time of one step goes, for the reference and for ours -> rows {impl, part, seconds}.

    One step of each (after a warm-up step) runs under the PyTorch profiler and its time is split by kind of
    work (``profile_parts``); ours is ``Trainer.train_step`` as it stands, so the split follows whatever the
    library does. A row ``"whole step"`` holds the step's time without the profiler: ``step_seconds``
    ({"reference": s, "ours": s}, e.g. from ``measure_steps`` at the same shape) or one timed step. ``aux``:
    ``"none"``, ``"official"`` (both) or ``"auxk"`` (ours, 10 % of the latents dead as in ``measure_steps``;
    the reference keeps the official term).
    """
    device = resolve_device(device)
    selected = selected or max(dims, key=lambda n: dims[n])
    i = list(dims).index(selected)
    batch = random_batch(dims, batch_size, device)
    rows: list[dict[str, Any]] = []
    for impl in tqdm(("reference", "ours"), desc="step parts", disable=not progress):
        torch.manual_seed(0)
        if impl == "reference":
            ref = OfficialReference(dims, n_latents, k, aux=aux != "none", device=device)
            step: Callable[[], object] = lambda ref=ref: ref.step(batch, i)  # noqa: E731
            step()
        else:
            ours = OurStep(dims, n_latents, k, aux, device, selected)
            step = lambda ours=ours: ours(batch)  # noqa: E731
            step()
        whole = step_seconds[impl] if step_seconds else median_time(step, 1, 0, device)
        with _ClippedOptimizerStep():
            parts = profile_parts(step, device)
        rows += [{"impl": impl, "part": part, "seconds": sec} for part, sec in parts.items()]
        rows.append({"impl": impl, "part": "whole step", "seconds": whole})
        del step
    return rows


# ---------------------------------------------------------------------------------------------- FLOP counts
def step_flops(dims: Mapping[str, int] = PAPER_DIMS, n_latents: int = PAPER_LATENTS, k: int = PAPER_K,
               batch_size: int = PAPER_BATCH, *, selected: str | None = None, aux: str = "official",
               n_dead: int | None = None) -> list[dict[str, Any]]:
    """Floating-point operations of one step, part by part, official reference vs ours -> rows
    {part, reference, ours, reference formula, ours formula} (counts, a multiply-add = 2).

    B tokens, selected width d, Σd over all M targets, m latents, k active. ``aux``: ``"none"``,
    ``"official"`` (dense in both) or ``"auxk"`` (ours: AuxK over ``n_dead`` dead latents, default 10 % of m as
    the benchmark; the library computes it densely over the dead columns, which on a CPU beats gathering
    k_aux ≈ C rows per token; the reference keeps the official term). Elementwise passes are counted as one
    operation per element; TopK as one comparison per element.
    Ours counts the sparse decode (one gather for all decoders), BatchNorm's statistics from the Gram matrix
    XᵀX and W·XᵀX (no pass over [B, m] for them) and, when the gradient reaching BatchNorm is sparse (no
    official aux), the sparse form of the encoder's weight gradient that reuses W·XᵀX.
    """
    B, m = batch_size, n_latents
    selected = selected or max(dims, key=lambda n: dims[n])
    d, D, M = dims[selected], sum(dims.values()), len(dims)
    C = round(0.1 * m) if n_dead is None else n_dead  # dead latents AuxK reads (dense over those columns)
    nnz = k                                         # sparse nonzeros per token of the gradient reaching BatchNorm
    ref_aux = aux != "none"
    sparse_bn = aux != "official"
    p_sel = 2 * m * d + 3 * m                       # W, b, γ, β, dictionary of the selected model
    p_all = sum(2 * m * w + 3 * m for w in dims.values())
    rows = [
        ("encoder GEMM  X Wᵀ", 2 * B * d * m, 2 * B * d * m, "2·B·d·m", "2·B·d·m"),
        ("BatchNorm statistics + ReLU", 6 * B * m, 2 * B * d * d + 2 * m * d * d + 2 * B * m, "≈6·B·m",
         "2·B·d² + 2·m·d² (Gram XᵀX, W·XᵀX) + ≈2·B·m"),
        ("TopK (k)", 2 * B * m, B * m, "B·m select + B·m scatter", "B·m select"),
        ("decode into all M", 2 * B * m * D, 2 * B * k * D, "2·B·m·Σd (dense z D)", "2·B·k·Σd (one gather)"),
        ("losses", 3 * B * D, 3 * B * D, "3·B·Σd", "3·B·Σd"),
    ]
    if ref_aux:
        ours_aux = (B * m + 2 * B * m * D, "B·m select + 2·B·m·Σd (dense)") if aux == "official" else \
            (B * C + 2 * B * C * D, "B·C select + 2·B·C·Σd (dense over the C dead columns)")
        rows.append(("auxiliary loss", M * (2 * B * m) + 2 * B * m * D, ours_aux[0],
                     "M·(B·m select + B·m scatter) + 2·B·m·Σd", ours_aux[1]))
    rows.append(("decode backward: code grad", 2 * B * m * D, 2 * B * k * D, "2·B·m·Σd", "2·B·k·Σd"))
    rows.append(("decode backward: dictionary grad", 2 * B * m * D, 2 * B * k * d,
                 "2·B·m·Σd (all M decoders)", "2·B·k·d (selected only)"))
    if ref_aux:
        ours_aux_bwd = ((2 * B * m * D + 2 * B * m * d, "2·B·m·Σd + 2·B·m·d") if aux == "official" else
                        (2 * B * C * D + 2 * B * C * d, "2·B·C·(Σd + d)"))
        rows.append(("auxiliary backward", 4 * B * m * D, ours_aux_bwd[0], "4·B·m·Σd", ours_aux_bwd[1]))
    rows.append(("encoder backward: weight grad", 2 * B * m * d + 6 * B * m,
                 2 * B * nnz * d + 4 * m * d if sparse_bn else 2 * B * m * d + 4 * B * m, "2·B·m·d + ≈6·B·m (BN)",
                 f"2·B·nnz·d + ≈4·m·d (nnz = {nnz}; reuses W·XᵀX)" if sparse_bn else "2·B·m·d + ≈4·B·m (dense)"))
    rows.append(("optimizer (clip + AdamW)", 3 * p_all + 14 * p_sel, 3 * p_sel + 14 * p_sel,
                 "3·P(all models) + 14·P(selected)", "17·P(selected)"))
    out = [{"part": p, "reference": float(r), "ours": float(o), "reference formula": fr, "ours formula": fo}
           for p, r, o, fr, fo in rows]
    out.append({"part": "total", "reference": sum(r["reference"] for r in out),
                "ours": sum(r["ours"] for r in out), "reference formula": "", "ours formula": ""})
    return out
