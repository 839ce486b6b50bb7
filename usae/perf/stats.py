"""Benchmark of the streaming firing statistics at ImageNet-val scale (``make bench`` entry ``"stats"``).

:func:`bench_firing` streams synthetic SparseCode batches (generated per batch, seeded; nothing of the
9.8 M tokens is stored) through :class:`usae.stats.firing.FiringAccumulator` and reports the wall time of the
accumulator alone and of the whole pass, tokens/s, and the peak resident set size of the process
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: everything the process ever held, Python and torch
allocations together, including the interpreter and torch themselves, which are reported separately as
``baseline_rss_gb``). The bench entry runs it in a fresh subprocess so the peak belongs to this pass only.

The reference is the official analysis' dense path: densify each model's code to ``[N, m]``, threshold,
and reduce (written in numpy, 10x faster than torch's CPU reductions here); it is timed on a small sample,
checked against the accumulator on it, and its memory for N tokens would be ``N * m * M * 4`` bytes.

Synthetic structure: latent popularity follows a power law (``p_j ∝ (rank_j + 1)^-alpha`` over a seeded
permutation), a fraction ``shared`` of each token's k slots is common to all models (so co-fires occur),
the rest is drawn per model; values are log-normal (median 0.37, about 10 % below tau = 0.1).

``python -m usae.perf.stats [--n-tokens N] [--json]`` runs one measurement (the ``stats`` entry of
``usae bench`` runs it so, in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from usae.core.sparse import SparseCode
from usae.perf.rows import row
from usae.perf.timing import timed
from usae.stats.firing import FiringAccumulator

FULL_TOKENS = 9_800_000  # ImageNet val: 50 000 images x 196 tokens
MEMORY_BUDGET_GB = 4.0
_TABLE = 1 << 16


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _distinct_rows(idx: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Make the k indices of every row distinct by redrawing duplicates uniformly (rows come out sorted)."""
    while True:
        idx.sort(axis=1)
        dup = np.zeros(idx.shape, dtype=bool)
        dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
        n_dup = int(dup.sum())
        if n_dup == 0:
            return idx
        idx[dup] = rng.integers(0, m, n_dup)


class SyntheticCodes:
    """Seeded generator of row-aligned SparseCodes for ``n_models`` models; batch ``b`` depends on (seed, b).

    Power-law popularity is sampled through a 2^16-entry inverse-CDF table (exact enough for a benchmark).
    """

    def __init__(self, n_models: int = 3, n_latents: int = 6144, k: int = 32, alpha: float = 1.0,
                 shared: float = 0.5, seed: int = 0) -> None:
        if not 1 <= k <= n_latents:
            raise ValueError(f"k = {k} is not valid; expected 1 <= k <= n_latents = {n_latents}")
        if not 0.0 <= shared <= 1.0:
            raise ValueError(f"shared = {shared} is not valid; expected a fraction in [0, 1]")
        self.names = tuple(f"model{i}" for i in range(n_models))
        self.n_latents, self.k, self.shared, self.seed = n_latents, k, shared, seed
        rng = np.random.default_rng([seed, 0])
        weight = (np.arange(n_latents, dtype=np.float64) + 1.0) ** -alpha
        cdf = np.cumsum(weight[rng.permutation(n_latents)])
        grid = (np.arange(_TABLE) + 0.5) / _TABLE * cdf[-1]
        self.table = np.minimum(np.searchsorted(cdf, grid), n_latents - 1).astype(np.int64)

    def batch(self, b: int, size: int) -> dict[str, SparseCode]:
        """Batch ``b`` of ``size`` tokens: ``{name: SparseCode [size, k]}``."""
        rng = np.random.default_rng([self.seed, b + 1])
        shape = (size, self.k)
        base = self.table[rng.integers(0, _TABLE, shape)]
        out = {}
        for name in self.names:
            idx = np.where(rng.random(shape) < self.shared, base, self.table[rng.integers(0, _TABLE, shape)])
            idx = _distinct_rows(idx, self.n_latents, rng)
            values = np.exp(0.8 * rng.standard_normal(shape, dtype=np.float32) - 1.0)
            out[name] = SparseCode(torch.from_numpy(values), torch.from_numpy(idx), self.n_latents)
        return out


def dense_reference(codes: dict[str, SparseCode], threshold: float = 0.1) -> dict[str, np.ndarray]:
    """The dense path (numpy, the faster of numpy and torch here): densify [M, N, m], threshold, reduce."""
    first = next(iter(codes.values()))
    z = np.zeros((len(codes), len(first), first.n_latents), dtype=np.float32)
    for j, c in enumerate(codes.values()):
        np.put_along_axis(z[j], c.indices.numpy(), c.values.numpy(), axis=1)
    above = z > threshold
    return {"fires": np.count_nonzero(above, axis=1), "cofires": np.count_nonzero(above.all(0), axis=0),
            "activation_sum": z.sum(1, dtype=np.float64), "nonzero": np.count_nonzero(z > 0, axis=1)}


def dense_check(codes: dict[str, SparseCode], threshold: float = 0.1, repeats: int = 3) -> tuple[float, bool]:
    """(tokens/s of :func:`dense_reference`, best of ``repeats``; whether the accumulator agrees with it)."""
    ref: dict[str, np.ndarray] = {}

    def dense() -> None:
        ref.update(dense_reference(codes, threshold))

    best = min(timed(dense) for _ in range(repeats))
    acc = FiringAccumulator(tuple(codes), next(iter(codes.values())).n_latents, threshold)
    acc.update(codes)
    ours = acc.result()
    same = all(np.array_equal(getattr(ours, k).numpy(), ref[k]) for k in ("fires", "cofires", "nonzero"))
    same = same and np.allclose(ours.activation_sum.numpy(), ref["activation_sum"], rtol=1e-5, atol=1e-4)
    return len(next(iter(codes.values()))) / best, bool(same)


def bench_firing(n_tokens: int = FULL_TOKENS, n_models: int = 3, n_latents: int = 6144, k: int = 32,
                 batch: int = 65_536, threshold: float = 0.1, seed: int = 0, dense_sample: int = 2048,
                 progress: bool = True) -> dict[str, Any]:
    """Stream ``n_tokens`` synthetic tokens through the firing accumulator; returns timings and memory.

    Keys: ``seconds`` (accumulator only), ``total_seconds`` (with generation), ``tokens_per_s``,
    ``peak_rss_gb`` / ``baseline_rss_gb`` (ru_maxrss after / before the pass), ``dense_tokens_per_s`` (on
    ``dense_sample`` tokens, 0 to skip) and ``agrees_with_dense`` (exact counts on that sample),
    ``dense_memory_gb`` (GiB that dense float32 codes of n_tokens would need),
    sanity counts, and the arguments.
    """
    if n_tokens <= 0 or batch <= 0:
        raise ValueError(f"n_tokens = {n_tokens}, batch = {batch}: both must be positive")
    torch.manual_seed(seed)
    source = SyntheticCodes(n_models, n_latents, k, seed=seed)
    baseline = _peak_rss_gb()
    acc = FiringAccumulator(source.names, n_latents, threshold)
    spent = 0.0
    start = time.perf_counter()
    n_batches = math.ceil(n_tokens / batch)
    for b in tqdm(range(n_batches), desc="firing bench", disable=not progress):
        codes = source.batch(b, min(batch, n_tokens - b * batch))
        t = time.perf_counter()
        acc.update(codes)
        spent += time.perf_counter() - t
    total = time.perf_counter() - start
    stats = acc.result()
    dense_tps, agrees = dense_check(source.batch(10**6, dense_sample), threshold) if dense_sample else (0.0, None)
    return {"n_tokens": n_tokens, "n_models": n_models, "n_latents": n_latents, "k": k, "batch": batch,
            "threads": torch.get_num_threads(), "seconds": spent, "total_seconds": total,
            "tokens_per_s": n_tokens / spent, "peak_rss_gb": _peak_rss_gb(), "baseline_rss_gb": baseline,
            "rss_measure": "ru_maxrss of this process (Python + torch + interpreter)",
            "dense_tokens_per_s": dense_tps, "agrees_with_dense": agrees,
            "dense_memory_gb": n_tokens * n_latents * n_models * 4 / 2**30,
            "mean_fires_per_token": float(stats.fires.sum()) / (n_tokens * n_models),
            "mean_cofires_per_token": float(stats.cofires.sum()) / n_tokens,
            "dead_after_threshold": int(stats.dead.sum())}


def _in_subprocess(n_tokens: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "usae.perf.stats", "--json", "--quiet", "--n-tokens", str(n_tokens)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def stats_entry(quick: bool) -> list[dict[str, object]]:
    r = _in_subprocess(200_000 if quick else FULL_TOKENS)
    if not r["agrees_with_dense"]:
        raise RuntimeError(f"firing accumulator disagrees with the dense reference: {r}")
    n = f"{r['n_tokens'] / 1e6:g}M tok"
    return [
        row("stats", f"firing pass tok/s vs dense ({n})", r["tokens_per_s"], r["dense_tokens_per_s"],
            "tok/s", r["tokens_per_s"] / r["dense_tokens_per_s"], 5.0),
        row("stats", f"firing pass peak RSS vs 4 GB budget ({n})", r["peak_rss_gb"], MEMORY_BUDGET_GB,
            "GB", MEMORY_BUDGET_GB / r["peak_rss_gb"], 1.0),
        row("stats", f"firing pass peak RSS vs dense codes ({n})", r["peak_rss_gb"], r["dense_memory_gb"],
            "GB", r["dense_memory_gb"] / r["peak_rss_gb"], None),
    ]




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usae.perf.stats", description=__doc__.splitlines()[0])
    parser.add_argument("--n-tokens", type=int, default=FULL_TOKENS)
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    result = bench_firing(args.n_tokens, batch=args.batch, progress=not args.quiet)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
