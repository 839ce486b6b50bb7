"""``usae bench --gpu-check``: everything a lent GPU should confirm, in one command of a few minutes.

1. ``kernels``: the Triton kernels (``usae.core.kernels.triton_backend``: gather-sum decode, sampled dots,
   segmented row sums) against the brute-force dense references of ``usae.core.kernels.reference``, at odd
   shapes and at the paper's shape, and the whole sparse decode (values and gradients) through the ``triton``
   backend against the ``torch`` one;
2. ``trainer``: a few ``Trainer`` steps on the Triton backend against the same steps on the torch backend
   (same losses and weights to float32 tolerance);
3. ``bf16``: the bfloat16 encoder GEMM (``Trainer.mixed_precision``) against float32 over the same steps
   (losses within 2 %), with both step times;
4. ``step``: the ``step`` bench entry's interleaved timings at the paper's shape against the official step;
5. ``peers``: our one-model step against sparsify (its Triton decoder on CUDA) and overcomplete, with memory;
6. ``sweep``: ours and the official step with its aux loss as m grows from 6144 to 65536.

It writes ``<runs>/bench/gpu-check-<UTC time>.json`` (or ``out``) and stops adding timed parts once
``budget_s`` (8 minutes) is spent. ``dry_run`` runs every part at tiny shapes on the given device, without the
memory probes (the tests run it on CPU, with ``TRITON_INTERPRET=1`` so that the Triton kernels run in
Triton's interpreter), so that the command cannot rot while no GPU is at hand. A dry run checks mechanics: its
timed parts pass when they produce rows, since speed-ups need not show at tiny shapes. On CPU the bf16 part is
skipped: it is CUDA only.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from usae.perf.rows import Row

__all__ = ["Check", "GpuCheckReport", "GpuShapes", "gpu_check", "PAPER_SHAPES", "DRY_SHAPES"]


@dataclass(frozen=True)
class GpuShapes:
    """The shapes of one ``gpu_check``: the step (dims, m, k, B), the kernel cases (n, m, k, widths), the
    peers' widths and the m sweep, and how many timed samples each timing takes."""

    dims: dict[str, int]
    n_latents: int
    k: int
    batch_size: int
    kernel_cases: tuple[tuple[int, int, int, tuple[int, ...]], ...]
    peer_dim: int
    peer_widths: tuple[int, ...]
    sweep: tuple[int, ...]
    train_steps: int = 3
    samples: int = 5
    peer_memory: bool = True


PAPER_SHAPES = GpuShapes({"dinov2": 384, "siglip": 768, "vit": 768}, 6144, 32, 6272,
                         ((9, 37, 1, (5,)), (13, 37, 3, (7, 70)), (1000, 6144, 32, (384, 768, 768)),
                          (6272, 6144, 32, (384, 768, 768))),
                         768, (6144, 24576), (6144, 16384, 32768, 65536))
DRY_SHAPES = GpuShapes({"a": 8, "b": 16, "c": 16}, 64, 4, 64, ((9, 37, 1, (5,)), (13, 37, 3, (7, 70))),
                       16, (64, 128), (64, 128), train_steps=2, samples=2, peer_memory=False)


@dataclass
class Check:
    """One part of the GPU check: passed (None: skipped, with the reason in ``detail["skipped"]``), its wall
    seconds, and what it measured."""

    name: str
    passed: bool | None
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class GpuCheckReport:
    """All parts of one ``gpu_check`` run, the bench rows of its timed parts and where the JSON went."""

    device: str
    dry_run: bool
    machine: dict[str, Any]
    checks: list[Check]
    rows: list[Row]
    path: Path | None = None

    @property
    def ok(self) -> bool:
        """Every part that ran passed."""
        return all(c.passed is not False for c in self.checks)

    def summary(self) -> str:
        lines = [f"GPU check on {self.device}{' (dry run)' if self.dry_run else ''}: "
                 f"{'all parts that ran passed' if self.ok else 'FAILED'}"]
        for c in self.checks:
            state = {True: "ok", False: "FAILED", None: "skipped"}[c.passed]
            why = f" ({c.detail['skipped']})" if c.passed is None else ""
            lines.append(f"  {c.name:<8} {state}{why}, {c.seconds:.1f} s")
        if self.path is not None:
            lines.append(f"  JSON: {self.path}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the parts
def _max_error(got: Tensor | Sequence[Tensor], want: Tensor | Sequence[Tensor]) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    got = [got] if isinstance(got, Tensor) else list(got)
    want = [want] if isinstance(want, Tensor) else list(want)
    pairs = [(a.detach().double(), b.detach().double()) for a, b in zip(got, want, strict=True) if b.numel()]
    return max((float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in pairs), default=0.0)


def _kernels(device: torch.device, shapes: GpuShapes) -> Check:
    from usae.core.kernels import reference
    from usae.core.kernels.dispatch import triton_module
    from usae.core.kernels.groups import group_by_latent
    from usae.core.sparse import SparseCode, sparse_decode_many

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return Check("kernels", None, 0.0, {"skipped": "Triton needs CUDA (or TRITON_INTERPRET=1 on CPU)"})
    kernels = triton_module()
    if kernels is None:
        return Check("kernels", None, 0.0, {"skipped": "triton cannot be imported"})
    start, errors = time.perf_counter(), {}
    for n, m, k, widths in shapes.kernel_cases:
        gen = torch.Generator().manual_seed(n + m + k)
        indices = torch.rand(n, m, generator=gen).topk(k, dim=1).indices.to(device)
        values = torch.rand(n, k, generator=gen).to(device)
        tables = [torch.randn(m, w, generator=gen).to(device) for w in widths]
        grads = [torch.randn(n, w, generator=gen).to(device) for w in widths]
        groups = group_by_latent(indices, m)
        err = {"gather_sum": _max_error(kernels.gather_sum(values, indices, tables),
                                        reference.gather_sum(values, indices, tables)),
               "sampled_dots": _max_error(kernels.sampled_dots(indices, grads, tables),
                                          reference.sampled_dots(indices, grads, tables))}
        if n * k <= 20_000:  # the reference is a Python loop over entries
            w = groups.gather(values)
            err["segment_rows"] = _max_error(kernels.segment_rows(groups.offsets, groups.tokens, w, grads[-1]),
                                             reference.segment_rows(groups.offsets, groups.tokens, w, grads[-1]))
        # the whole decode and its backward: the triton backend against the torch one
        outs = {}
        for backend in ("triton", "torch"):
            v = values.clone().requires_grad_(True)
            ws = [t.clone().requires_grad_(True) for t in tables]
            recon = sparse_decode_many(SparseCode(v, indices, m), ws, backend)
            sum((r * g).sum() for r, g in zip(recon, grads, strict=True)).backward()
            outs[backend] = [*recon, v.grad, *[t.grad for t in ws]]
        err["decode + backward"] = _max_error(outs["triton"], outs["torch"])
        errors[f"n={n}, m={m}, k={k}, widths={list(widths)}"] = err
    worst = max(e for case in errors.values() for e in case.values())
    return Check("kernels", worst < 1e-4, time.perf_counter() - start, {"relative errors": errors, "worst": worst})


def _steps(model: Any, device: torch.device, shapes: GpuShapes, **trainer: Any) -> tuple[list[float], Any, float]:
    """Losses, final model and seconds per step of ``train_steps`` Trainer steps on seeded random batches."""
    from usae.config import TrainConfig
    from usae.perf.timing import random_batch, sync
    from usae.train.trainer import Trainer

    cfg = TrainConfig(steps=shapes.train_steps, batch_size=shapes.batch_size, warmup_steps=0,
                      log_every=shapes.train_steps)
    mixed = trainer.pop("mixed_precision", False)
    batches = [random_batch(shapes.dims, shapes.batch_size, device, seed=s) for s in range(shapes.train_steps)]
    warm = Trainer(copy.deepcopy(model), cfg, progress=False, **trainer)  # compiles the kernels, untimed
    warm.mixed_precision = mixed
    warm.train_step(batches[0])
    t = Trainer(model, cfg, progress=False, **trainer)
    t.mixed_precision = mixed
    sync(device)
    start = time.perf_counter()
    history = t.fit(batches)
    sync(device)
    return list(history.loss), model, (time.perf_counter() - start) / len(batches)


def _trainer(device: torch.device, shapes: GpuShapes) -> Check:
    from usae.core.model import UniversalSAE

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return Check("trainer", None, 0.0, {"skipped": "Triton needs CUDA (or TRITON_INTERPRET=1 on CPU)"})
    start = time.perf_counter()
    torch.manual_seed(0)
    init = UniversalSAE(shapes.dims, shapes.n_latents, shapes.k).to(device)
    fast, fast_model, fast_s = _steps(copy.deepcopy(init), device, shapes, backend="triton")
    slow, slow_model, slow_s = _steps(copy.deepcopy(init), device, shapes, backend="torch")
    loss_err = _max_error(torch.tensor(fast), torch.tensor(slow))
    weights = slow_model.state_dict()
    weight_err = max(_max_error(v.float(), weights[key].float()) for key, v in fast_model.state_dict().items()
                     if v.is_floating_point())
    return Check("trainer", loss_err < 1e-4 and weight_err < 1e-3, time.perf_counter() - start,
                 {"losses triton": fast, "losses torch": slow, "loss error": loss_err, "weight error": weight_err,
                  "seconds per step triton": fast_s, "seconds per step torch": slow_s})


def _bf16(device: torch.device, shapes: GpuShapes) -> Check:
    from usae.core.model import UniversalSAE

    if device.type != "cuda":
        return Check("bf16", None, 0.0, {"skipped": "the bfloat16 encoder GEMM is CUDA only"})
    start = time.perf_counter()
    torch.manual_seed(0)
    init = UniversalSAE(shapes.dims, shapes.n_latents, shapes.k).to(device)
    half, _, half_s = _steps(copy.deepcopy(init), device, shapes, mixed_precision=True)
    full, _, full_s = _steps(copy.deepcopy(init), device, shapes)
    err = max(abs(a - b) / abs(b) for a, b in zip(half, full, strict=True))
    return Check("bf16", err < 0.02, time.perf_counter() - start,
                 {"losses bf16": half, "losses fp32": full, "relative loss difference": err,
                  "seconds per step bf16": half_s, "seconds per step fp32": full_s})


def _timed(name: str, fn: Callable[[], list[Row]], judge: bool) -> tuple[Check, list[Row]]:
    """Run a timed part; it passes when every row that has a target meets it (``judge``) or, in a dry run at
    tiny shapes where speed-ups need not show, when it produced rows."""
    start = time.perf_counter()
    rows = fn()
    failed = [r["what"] for r in rows if r["passed"] is False]
    passed = not failed if judge else bool(rows)
    return Check(name, passed, time.perf_counter() - start, {"rows": len(rows), "below target": failed}), rows


def _step(device: torch.device, shapes: GpuShapes) -> list[Row]:
    from usae.perf.step import step_rows, tokens_rows
    from usae.perf.timing import measure_steps

    times = measure_steps(shapes.dims, shapes.n_latents, shapes.k, shapes.batch_size, device=device,
                          samples=shapes.samples, progress=False)
    shape = f"B={shapes.batch_size}, m={shapes.n_latents}, M={len(shapes.dims)}, {device.type}"
    return step_rows(times, None, shape) + tokens_rows(times, shapes.batch_size, shape)


def _peers(device: torch.device, shapes: GpuShapes) -> list[Row]:
    from usae.perf.peers import compare_peers, peer_rows

    return peer_rows(compare_peers(shapes.peer_widths, shapes.peer_dim, shapes.k, shapes.batch_size,
                                   samples=shapes.samples, device=device, memory=shapes.peer_memory))


def _sweep(device: torch.device, shapes: GpuShapes) -> list[Row]:
    from usae.perf.step import latents_rows

    return latents_rows(shapes.dims, shapes.n_latents, shapes.k, shapes.batch_size, shapes.sweep, device,
                        shapes.samples)


# ---------------------------------------------------------------------------------------------- the command
def gpu_check(device: str | torch.device = "cuda", *, dry_run: bool = False, out: str | os.PathLike | None = None,
              budget_s: float = 480.0, shapes: GpuShapes | None = None,
              progress: Callable[[str], None] | None = print) -> GpuCheckReport:
    """Run the parts in order (see the module docstring), write the JSON report and return it. A timed part
    that would start after ``budget_s`` seconds is skipped and says so."""
    from usae.config import runs_dir
    from usae.perf.step import device_info
    from usae.perf.timing import resolve_device

    device = resolve_device(device)
    if device.type != "cuda" and not dry_run:
        raise ValueError(f"device = {str(device)!r} is not valid for the GPU check; expected a CUDA device (or "
                         "dry_run=True / --dry-run for a tiny run on CPU)")
    shapes = shapes or (DRY_SHAPES if dry_run else PAPER_SHAPES)
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    checks: list[Check] = []
    rows: list[Row] = []
    for name, part in (("kernels", _kernels), ("trainer", _trainer), ("bf16", _bf16)):
        say(f"[gpu-check] {name} ...")
        checks.append(part(device, shapes))
    for name, timed_part in (("step", _step), ("peers", _peers), ("sweep", _sweep)):
        spent = time.perf_counter() - started
        if spent > budget_s:
            checks.append(Check(name, None, 0.0, {"skipped": f"the {budget_s:.0f} s budget was spent ({spent:.0f} s)"}))
            continue
        say(f"[gpu-check] {name} ...")
        check, got = _timed(name, lambda timed_part=timed_part: timed_part(device, shapes), judge=not dry_run)
        checks.append(check)
        rows += got
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    report = GpuCheckReport(str(device), dry_run, device_info(), checks, rows)
    path = Path(out) if out is not None else runs_dir() / "bench" / f"gpu-check-{stamp.replace(':', '')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"time": stamp, "device": report.device, "dry_run": dry_run, "ok": report.ok,
              "machine": report.machine, "shapes": asdict(shapes), "checks": [asdict(c) for c in checks],
              "rows": rows}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)
    report.path = path
    return report

