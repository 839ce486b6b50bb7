"""Data-path benchmarks: extraction overhead over the bare backbone forward, and store read rate against
what a training step consumes. Registered as ``make bench`` entries ``extract`` and ``store``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from usae.config import ExtractConfig, ToyWorldConfig, TrainConfig, USAEConfig
from usae.data.store import ActivationStore
from usae.perf.rows import row
from usae.perf.timing import timed


def store_read_rate(store: ActivationStore, split: str = "train", batch_size: int = 1024,
                    max_rows: int = 200_000, seed: int = 0) -> float:
    """Rows per second of shuffled, aligned ``store.batches`` (all models), over at most ``max_rows`` rows.

    The same rows are read once untimed first, as every epoch after a training run's first one reads them:
    the timed pass measures the store, not whether the operating system still caches its files (a cold
    first read ran 30x slower on this VM, and varied with what ran before).
    """
    def read() -> int:
        rows = 0
        for batch in store.batches(split, batch_size, shuffle=True, seed=seed):
            rows += len(next(iter(batch.values())))
            if rows >= max_rows:
                break
        return rows

    read()
    started = time.perf_counter()
    rows = read()
    return rows / (time.perf_counter() - started)


def training_consumption_rate(dims: Mapping[str, int], usae: USAEConfig, train: TrainConfig,
                              steps: int = 10) -> float:
    """Rows per second that the trainer's step consumes at these shapes (random data, after one warm-up step)."""
    from usae.core.model import UniversalSAE
    from usae.train.trainer import Trainer

    gen = torch.Generator().manual_seed(0)
    model = UniversalSAE(dims, usae.width(dims), usae.k, encoder=usae.encoder, init=usae.init)
    trainer = Trainer(model, train.replace(steps=steps + 1), progress=False)
    batches = [{n: torch.randn(train.batch_size, d, generator=gen) for n, d in dims.items()} for _ in range(2)]
    trainer.train_step(batches[0])
    started = time.perf_counter()
    for i in range(steps):
        trainer.train_step(batches[i % 2])
    return steps * train.batch_size / (time.perf_counter() - started)


def extraction_overhead(backbones: Mapping[str, nn.Module], images: torch.Tensor, cfg: ExtractConfig,
                        repeats: int = 3) -> tuple[float, float]:
    """(seconds of ``extract_store`` over ``images``, seconds of the bare backbone forwards over the same
    batches), each the best of ``repeats``; the store is written to a temporary folder."""
    from usae.data.extract import extract_store

    def bare() -> None:
        with torch.no_grad():
            for bb in backbones.values():
                for lo in range(0, len(images), cfg.batch_size):
                    bb(images[lo:lo + cfg.batch_size])

    def ours() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            extract_store(backbones, {"train": images}, cfg, Path(tmp) / "store", progress=False)

    best = {"bare": float("inf"), "ours": float("inf")}
    bare()  # warm-up
    for _ in range(repeats):
        for name, fn in (("bare", bare), ("ours", ours)):
            best[name] = min(best[name], timed(fn))
    return best["ours"], best["bare"]


def _toy_backbones() -> dict[str, nn.Module]:
    from usae.config import BackboneSpec
    from usae.data.zoo import load_backbone

    return {n: load_backbone(BackboneSpec(n, pretrained=False)).eval()
            for n in ("toy_vit", "toy_convnext", "toy_mixer")}


def extract_entry(quick: bool) -> list[dict[str, object]]:
    from usae.data.toyworld import ToyWorld

    n = 256 if quick else 1024
    images = ToyWorld(ToyWorldConfig()).batch("train", 0, n).images
    cfg = ExtractConfig(n_train_images=n, n_stats_images=min(n, 1000), batch_size=128)
    ours, bare = extraction_overhead(_toy_backbones(), images, cfg, repeats=2 if quick else 3)
    return [row("extract", f"extract_store vs bare forward, 3 toy models, {n} img", ours, bare, "s",
                bare / ours, 1 / 1.10)]

def store_entry(quick: bool) -> list[dict[str, object]]:
    from usae.config import preset
    from usae.data.extract import extract_store

    book = preset("book")
    dims = {n: bb.dim for n, bb in _toy_backbones().items()}
    train = book.train.replace(steps=20)
    consume = training_consumption_rate(dims, book.usae, train, steps=3 if quick else 10)
    n = 512 if quick else 3000
    images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(n_train_images=n, n_stats_images=min(n, 1000), batch_size=128)
        store = extract_store(_toy_backbones(), {"train": images}, cfg, Path(tmp) / "store", progress=False)
        read = max(store_read_rate(store, batch_size=train.batch_size) for _ in range(3))
    return [row("store", f"store read vs book trainer step ({n * 64} rows)", read, consume, "rows/s",
                read / consume, 5.0)]


