"""Our single-model step against two published TopK SAE libraries, in the same process (``usae bench`` entry
``"peers"``; chapter 10).

At M = 1 a USAE is a plain TopK SAE, so its training step can be timed against other implementations of the
same thing. The peers are the training steps their libraries use, built through their public APIs:

- ``sparsify`` (EleutherAI, distribution ``eai-sparsify``): ``SparseCoder`` (fused encoder with a sparse
  backward, embedding-bag decode; no BatchNorm), loss FVU, then its trainer's own step: remove the gradient
  parallel to the decoder rows, Adam, re-normalise the decoder. On CPU it decodes with its eager embedding-bag
  implementation (its Triton decoder needs a GPU); on CUDA with its Triton decoder.
- ``overcomplete`` (``overcomplete``): ``TopKSAE`` (Linear + BatchNorm encoder, dense decode), MSE, the
  gradient clipping at 1.0 of its ``train_sae``, Adam.

Ours: ``Trainer.train_step`` of a one-model ``UniversalSAE`` (Linear -> BatchNorm -> ReLU -> TopK, MSE, clip
1.0, AdamW), and the same with ``encoder="linear"``. ``floor`` is ``usae.perf.timing.step_floor``: the
forward GEMM plus our sparse kernels alone. All sides see the same batch, threads and process; they are timed
by ``interleaved`` (same warm-up, interleaved samples, the quiet-machine guard). Memory is measured per side in
a fresh process (``python -m usae.perf.peers --memory SIDE ...``): the peak resident memory during a few steps
minus the memory held once data and model exist (on CUDA: peak allocated minus allocated).

The peers are optional (``pip install -e .[bench]``); a side that is not installed gives rows that say so.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from usae.perf.rows import Row, row
from usae.perf.timing import PAPER_BATCH, PAPER_K, Timings, interleaved, resolve_device, step_floor

__all__ = ["PEERS", "SIDES", "PeerComparison", "peer_version", "make_side", "compare_peers", "peer_rows",
           "side_memory"]

PEERS: dict[str, str] = {"sparsify": "eai-sparsify", "overcomplete": "overcomplete"}  # module -> distribution
SIDES = ("ours", "ours_linear", "sparsify", "overcomplete", "floor")
WIDTHS = (6144, 24576)
DIM = 768
INSTALL_HINT = "pip install -e '.[bench]'"


def peer_version(name: str) -> str | None:
    """The installed version of peer ``name`` (a key of ``PEERS``), or None when it cannot be imported."""
    if name not in PEERS:
        raise ValueError(f"peer = {name!r} is not valid; expected one of {list(PEERS)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(name)
        return importlib.metadata.version(PEERS[name])
    except Exception:  # noqa: BLE001 - any failure to import means the side cannot run here
        return None


def _sparsify(dim: int, n_latents: int, k: int, x: Tensor, device: torch.device) -> Callable[[], None]:
    from sparsify import SparseCoder, SparseCoderConfig, sparse_coder, utils

    # its Triton decoder needs a GPU; on CPU the library's own eager embedding-bag decoder
    sparse_coder.decoder_impl = utils.triton_decode if device.type == "cuda" else utils.eager_decode
    sae = SparseCoder(dim, SparseCoderConfig(num_latents=n_latents, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def run() -> None:
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return run


def _overcomplete(dim: int, n_latents: int, k: int, x: Tensor, device: torch.device) -> Callable[[], None]:
    with warnings.catch_warnings():  # its import warns about matplotlib and pyparsing deprecations
        warnings.simplefilter("ignore")
        from overcomplete.sae import TopKSAE

    sae = TopKSAE(dim, nb_concepts=n_latents, top_k=k, device=str(device))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def run() -> None:
        opt.zero_grad()
        _, _, x_hat = sae(x)
        (x - x_hat).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return run


def make_side(side: str, dim: int, n_latents: int, k: int, x: Tensor, device: torch.device) -> Callable[[], None]:
    """One training step of ``side`` (``SIDES``) on the rows ``x`` [B, dim], as a callable."""
    from usae.core.model import UniversalSAE
    from usae.perf.timing import OurStep

    torch.manual_seed(0)
    if side in ("ours", "ours_linear"):
        model = UniversalSAE({"x": dim}, n_latents, k, "linear" if side == "ours_linear" else "batchnorm")
        ours = OurStep({"x": dim}, n_latents, k, "none", device, "x", model=model.to(device), loss="l2")
        batch = {"x": x}
        return lambda: ours(batch)
    if side == "floor":
        return step_floor({"x": dim}, "x", n_latents, k, x.shape[0], device)
    if side == "sparsify":
        return _sparsify(dim, n_latents, k, x, device)
    if side == "overcomplete":
        return _overcomplete(dim, n_latents, k, x, device)
    raise ValueError(f"side = {side!r} is not valid; expected one of {list(SIDES)}")


@dataclass
class PeerComparison:
    """Per width m: the interleaved timings of the sides that ran (``timings[m]``), the peak memory per step
    of each side in MiB (``memory[m][side]``, when measured), and the peers' versions (None: not installed)."""

    dim: int
    k: int
    batch_size: int
    device: str
    versions: dict[str, str | None]
    timings: dict[int, Timings] = field(default_factory=dict)
    memory: dict[int, dict[str, float]] = field(default_factory=dict)

    def median(self, m: int, side: str) -> float:
        """Median seconds per step of ``side`` at width ``m`` (NaN when it did not run)."""
        t = self.timings[m].sides.get(side)
        return t.median if t is not None else float("nan")

    def fastest_peer(self, m: int) -> str | None:
        """The installed peer with the fastest median step at width ``m``."""
        ran = [p for p in PEERS if p in self.timings[m].sides]
        return min(ran, key=lambda p: self.median(m, p)) if ran else None

    def table(self) -> list[dict[str, object]]:
        """One row per side and width: {side, version, m, median s, fastest s, slowest s, samples, memory MiB}
        (memory None where not measured)."""
        out: list[dict[str, object]] = []
        for m, times in self.timings.items():
            for side, t in times.sides.items():
                version = self.versions.get(side) or ("usae" if side.startswith("ours") else "-")
                out.append({"side": side, "version": version, "m": m, "median s": t.median, "fastest s": t.spread[0],
                            "slowest s": t.spread[1], "samples": len(t.samples),
                            "memory MiB": self.memory.get(m, {}).get(side)})
        return out

    def growth(self) -> dict[str, float]:
        """side -> step time at the largest width / at the smallest (how each side scales with m)."""
        lo, hi = min(self.timings), max(self.timings)
        return {s: self.median(hi, s) / self.median(lo, s) for s in self.timings[lo].sides
                if s in self.timings[hi].sides}


def side_memory(side: str, dim: int, n_latents: int, k: int, batch_size: int, device: str = "cpu",
                timeout: float = 600) -> float:
    """Peak memory one step of ``side`` needs, in MiB, measured in a fresh Python process."""
    cmd = [sys.executable, "-m", "usae.perf.peers", "--memory", side, "--dim", str(dim), "--latents",
           str(n_latents), "--k", str(k), "--batch", str(batch_size), "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"memory of {side} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


def compare_peers(widths: Sequence[int] = WIDTHS, dim: int = DIM, k: int = PAPER_K, batch_size: int = PAPER_BATCH,
                  *, samples: int = 5, warmup: int = 2, device: str | torch.device | None = "cpu",
                  memory: bool = True, progress: bool = False) -> PeerComparison:
    """Time every installed side at each width in ``widths`` (one interleaved measurement per width, the
    same batch for all sides) and, with ``memory``, measure each side's memory per step in a fresh process."""
    device = resolve_device(device)
    versions = {p: peer_version(p) for p in PEERS}
    sides = [s for s in SIDES if s not in PEERS or versions[s] is not None]
    out = PeerComparison(dim, k, batch_size, device.type, versions)
    x = torch.randn(batch_size, dim, generator=torch.Generator().manual_seed(0)).to(device)
    for m in widths:
        calls = {s: make_side(s, dim, m, k, x, device) for s in sides}
        out.timings[m] = interleaved(calls, samples, warmup, device=device, progress=progress,
                                     desc=f"peers, m={m}")
        del calls
        if memory:
            out.memory[m] = {s: side_memory(s, dim, m, k, batch_size, device.type) for s in sides if s != "floor"}
    return out


def peer_rows(cmp: PeerComparison) -> list[Row]:
    """The ``peers`` entry's rows: per width, ours against each peer, against the fastest peer (target 2x),
    against the floor (step <= 1.3x floor) and, when measured, memory against the best peer (target 2x)."""
    rows: list[Row] = []
    for m, times in cmp.timings.items():
        shape = f"m={m}, d={cmp.dim}, B={cmp.batch_size}, {cmp.device}"
        ours = times.sides["ours"]

        def pair(what: str, side: str, target: float | None, mine: str = "ours", times: Timings = times,
                 shape: str = shape) -> Row:
            a, b = times.sides[mine], times.sides[side]
            return row("peers", f"{what} ({shape})", a.median, b.median, "s", b.median / a.median, target,
                       ours_spread=a.spread, reference_spread=b.spread, samples=min(len(a.samples), len(b.samples)),
                       noisy=times.noisy)

        for peer, version in cmp.versions.items():
            if version is None:
                rows.append(row("peers", f"ours vs {peer}: not installed ({INSTALL_HINT}) ({shape})", ours.median,
                                float("nan"), "s", float("nan"), None))
            else:
                rows.append(pair(f"ours vs {peer} {version}", peer, None))
        fastest = cmp.fastest_peer(m)
        if fastest is not None:
            rows.append(pair(f"ours vs fastest peer ({fastest})", fastest, 2.0))
            rows.append(pair(f"ours linear enc. vs fastest peer ({fastest})", fastest, None, mine="ours_linear"))
        rows.append(pair("floor (fwd GEMM + sparse kernels) / our step", "floor", 1 / 1.3))
        mem = cmp.memory.get(m, {})
        peers_mem = {p: mem[p] for p in PEERS if p in mem}
        if "ours" in mem and peers_mem:
            best = min(peers_mem, key=peers_mem.get)
            rows.append(row("peers", f"memory per step: ours vs best peer ({best}) ({shape})", mem["ours"],
                            peers_mem[best], "MiB", peers_mem[best] / max(mem["ours"], 1e-9), 2.0))
    return rows


def peers_entry(quick: bool) -> list[Row]:
    """``usae bench peers``: B = 6272 (``quick``: 1568), widths 6144 and 24576, memory included."""
    device = os.environ.get("USAE_BENCH_DEVICE", "auto")
    return peer_rows(compare_peers(batch_size=PAPER_BATCH // 4 if quick else PAPER_BATCH, device=device,
                                   progress=True))


# ---------------------------------------------------------------------------------------------- memory probe
def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _probe(side: str, dim: int, n_latents: int, k: int, batch_size: int, device: torch.device) -> float:
    x = torch.randn(batch_size, dim, generator=torch.Generator().manual_seed(0)).to(device)
    step = make_side(side, dim, n_latents, k, x, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _status_mib("VmRSS")
    try:  # reset the peak to the current resident size (Linux), so that building does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    for _ in range(3):
        step()
    peak = _status_mib("VmHWM")
    if base is None or peak is None:
        raise RuntimeError("memory probe: /proc/self/status is not readable on this system")
    return peak - base


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m usae.perf.peers",
                                description="Peak memory of one side's training steps, in a fresh process.")
    p.add_argument("--memory", choices=[s for s in SIDES if s != "floor"], required=True)
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--latents", type=int, default=WIDTHS[0])
    p.add_argument("--k", type=int, default=PAPER_K)
    p.add_argument("--batch", type=int, default=PAPER_BATCH)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    peak = _probe(args.memory, args.dim, args.latents, args.k, args.batch, resolve_device(args.device))
    print(json.dumps({"side": args.memory, "peak_mib": peak}))


if __name__ == "__main__":
    main()
