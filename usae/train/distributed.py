"""Data-parallel USAE training with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), launched by torchrun.

``DistributedTrainer`` trains exactly what one ``Trainer`` process trains on the same global batches, up to
floating-point summation order:

- each global batch of ``batch_size`` rows is cut into ``world`` contiguous slices and rank r reads only its
  slice (store rows are gathered from the memory maps; a dict is indexed). An :class:`usae.data.online.OnlineSource`
  is sharded by image blocks instead: rank r runs the backbones on its blocks only and makes batches of
  ``batch_size / world`` rows from them (the same number of batches on every rank);
- the model picked at each step comes from the trainer's seeded generator, the same on every rank; a cheap
  check (folded into the gradient all-reduce, read at each log) raises if ranks ever disagree;
- the encoder's BatchNorm uses the statistics of the **global** batch (a differentiable all-reduce of the
  sums and of the centred squares) and updates the running statistics as ``nn.BatchNorm1d`` would on the
  global batch (``torch.nn.SyncBatchNorm`` is CUDA-only);
- gradients are averaged over ranks in one flat all-reduce (the mean of equal-sized local means is the global
  mean); dead-latent counters are merged every step (fired anywhere, tokens of all ranks), the history losses
  at each flush and the running R² sums at each log (its ``"batch_mean"`` baseline then averages per-rank
  batches); rank 0 writes checkpoints and artifacts while the others wait, and every rank resumes from them.

One parameter is not reproducible by any implementation: the encoder's Linear bias before BatchNorm has a zero
gradient in exact arithmetic, so it (and BatchNorm's running mean, which follows it) only receives rounding noise
that AdamW scales up to steps of about the learning rate; it has no effect on training-mode codes.

Command line (rank 0 writes ``OUT/model.safetensors``, ``OUT/history.json`` and ``OUT/checkpoints/``; running
the same command again resumes from the latest checkpoint)::

    torchrun --nproc_per_node N -m usae.train.distributed --preset {smoke,book,paper} --store DIR --out DIR
    torchrun --nproc_per_node N -m usae.train.distributed --preset paper --images DIR --out DIR [--bf16]

``--store``: an activation store (``usae.data.store``); ``--images``: an image folder (``train/`` and ``val/``
subfolders, or one folder split in two) streamed through the preset's backbones (``--models``) with no
activation cache. Without torchrun the same command trains in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from usae.config import TrainConfig
from usae.core.model import UniversalSAE
from usae.data.online import OnlineSource
from usae.data.sharding import shard_source
from usae.train.history import TrainHistory
from usae.train.trainer import Trainer

__all__ = ["DistributedTrainer", "synced_batch_norm", "init_distributed", "shard_source", "main"]


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; the gradient of every rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def synced_batch_norm(h: Tensor, bn: nn.BatchNorm1d, group: Any = None) -> Tensor:
    """``bn(h)`` in training mode with the statistics of all ranks' rows: h [N_local, m] -> float32 [N_local, m]
    (statistics in float32 even under autocast, as ``F.batch_norm``)."""
    h = h.float()
    sums = _AllReduceSum.apply(torch.cat([h.sum(0), h.new_tensor([h.shape[0]])]), group)
    count = sums[-1].detach()
    mean = sums[:-1] / count
    centred = h - mean
    var = _AllReduceSum.apply(centred.square().sum(0), group) / count          # biased, as BatchNorm normalises
    out = centred * torch.rsqrt(var + bn.eps)
    if bn.affine:
        out = out * bn.weight + bn.bias
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
            bn.running_var.mul_(1 - f).add_(var.detach() * (count / (count - 1)), alpha=f)
    return out


# ---------------------------------------------------------------------------------------------- trainer
class DistributedTrainer(Trainer):
    """A ``Trainer`` whose every rank holds the full model and trains on its slice of each global batch.

    Call :func:`init_distributed` (or run under torchrun and call it) first; ``config.batch_size`` is the global
    batch and must be divisible by the world size. Arguments as ``Trainer``; progress shows on rank 0 only.
    """

    fused_encoder = False  # BatchNorm statistics come from _pre_activations (synced over ranks)

    def __init__(self, model: UniversalSAE, config: TrainConfig, *, group: Any = None, **kwargs: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised; call usae.train.distributed.init_distributed() "
                             "(under torchrun, or alone for one process) before building a DistributedTrainer")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if config.batch_size % self.world:
            raise ValueError(f"TrainConfig.batch_size = {config.batch_size} is not valid for {self.world} ranks; "
                             "expected a multiple of the world size")
        if kwargs.get("progress", True) and self.rank != 0:
            kwargs["progress"] = False
        super().__init__(model, config, **kwargs)
        self._selected = 0
        self._disagree = torch.zeros((), device=self.device)

    # -- hooks of Trainer.train_step ----------------------------------------------------------------------
    def _pre_activations(self, name: str, x: Tensor) -> Tensor:
        self._selected = self.model.index(name)
        coder = self.model.coder(name)
        if coder.bn is None or self.world == 1:  # one rank: the plain path, bit for bit
            return super()._pre_activations(name, x)
        self.model.check_input(name, x)
        return synced_batch_norm(coder.linear(x), coder.bn, self.group)

    def _reduce_gradients(self, stepped: tuple[str, ...]) -> None:
        params = [p for n in stepped for p in self.model.model_parameters(n) if p.grad is not None]
        i = float(self._selected)
        check = torch.tensor([1.0, i, i * i], device=self.device)
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [check])
        dist.all_reduce(flat, group=self.group)
        count, s1, s2 = flat[-3], flat[-2], flat[-1]
        self._disagree += (count * s2 - s1 * s1).abs()                # 0 iff every rank picked the same model
        flat = flat[:-3].div_(self.world)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()

    def train_step(self, batch: Mapping[str, Tensor]) -> int:
        """One step on this rank's slice; the dead-latent counters are then merged over ranks."""
        before = self.since_fire.clone()
        i = super().train_step(batch)
        rows = len(next(iter(batch.values())))
        fired = torch.cat([(self.since_fire[i] == 0).float(), torch.tensor([float(rows)], device=self.device)])
        dist.all_reduce(fired, group=self.group)                        # fired anywhere; tokens of all ranks
        self.since_fire[i] = torch.where(fired[:-1] > 0, 0, before[i] + fired[-1].round().long())
        return i

    # -- statistics --------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if self._pending:
            terms = torch.stack([p[-1] for p in self._pending]).to(self.device)
            dist.all_reduce(terms, group=self.group)
            terms /= self.world
            self._pending = [tuple(p[:-1]) + (t,) for p, t in zip(self._pending, terms, strict=True)]
        if float(self._disagree) != 0.0:
            raise RuntimeError("ranks picked different models at some step: their trainer generators diverged "
                               "(every rank must build the trainer with the same TrainConfig.seed)")
        super()._flush()

    def _global_window(self) -> dict[str, Tensor]:
        state = self.window.state()
        keys = sorted(state)
        flat = torch.cat([state[k].reshape(-1) for k in keys]).to(self.device)
        dist.all_reduce(flat, group=self.group)
        out, offset = {}, 0
        for k in keys:
            out[k] = flat[offset:offset + state[k].numel()].view_as(state[k]).cpu()
            offset += state[k].numel()
        return out

    def _log(self) -> dict[str, Any]:
        self.window.load_state(self._global_window())
        return super()._log()

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Rank 0 writes (with the R² sums of all ranks); every rank returns once it is on disk."""
        self._flush()
        local, failure = self.window.state(), None
        merged = self._global_window()
        path = self.checkpoint_dir / f"step_{self.step:09d}" if self.checkpoint_dir is not None else None
        if self.rank == 0:
            try:
                self.window.load_state(merged)
                path = super().save_checkpoint()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failure = exc
            finally:
                self.window.load_state(local)
        ok = torch.tensor([0.0 if failure else 1.0], device=self.device)
        dist.all_reduce(ok, group=self.group)
        if failure is not None:
            raise failure
        if int(ok.item()) != self.world:
            raise RuntimeError("rank 0 could not write the checkpoint (see its error)")
        return path

    def resume(self) -> Path | None:
        path = super().resume()
        if self.rank != 0:  # the checkpoint holds the R² sums of all ranks: count them once
            self.window.reset()
        return path

    def fit(self, source: Any) -> TrainHistory:
        """Train on this rank's share of ``source`` (see :func:`shard_source`)."""
        history = super().fit(shard_source(source, self.rank, self.world))
        dist.barrier(group=self.group)
        return history


# ---------------------------------------------------------------------------------------------- launching
def init_distributed(backend: str = "auto", device: str = "auto") -> tuple[int, int, torch.device]:
    """Join torchrun's process group (or make a one-process group); returns (rank, world size, device).

    backend: ``"nccl"``, ``"gloo"`` or ``"auto"`` (nccl with CUDA); device: ``"cuda"`` (``cuda:LOCAL_RANK``),
    ``"cpu"`` or ``"auto"``.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend = {backend!r} is not valid; expected 'auto', 'nccl' or 'gloo'")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device = {device!r} is not valid; expected 'auto', 'cuda' or 'cpu'")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but CUDA is not available; use device='cpu'")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), dev


def _parser() -> argparse.ArgumentParser:
    from usae.config import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m usae.train.distributed",
        description="Train a USAE data-parallel over torchrun's processes (one process without torchrun).\n"
                    "Rank 0 writes OUT/model.safetensors, OUT/history.json and OUT/checkpoints/; running the\n"
                    "same command again resumes from the latest checkpoint.",
        epilog="examples:\n  torchrun --nproc_per_node 8 -m usae.train.distributed --preset paper "
               "--store runs/acts/store --out runs/usae\n  torchrun --nproc_per_node 8 -m usae.train.distributed "
               "--preset paper --images /data/imagenet --out runs/usae-online --bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="book",
                   help="USAE shape and training recipe (usae.config.preset; default: book)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", type=Path, metavar="DIR", help="an activation store (usae.data.store) to train on")
    source.add_argument("--images", type=Path, metavar="DIR",
                        help="an image folder streamed through the backbones, no activation cache (train/ and val/ "
                             "subfolders, or one folder split like usae.data.sources.folder_sources)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the model, history and checkpoints go")
    p.add_argument("--split", default="train", help="split to train on (default: train)")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="backbones to train on (default: all of the store's, or the preset's backbones)")
    for flag, kind, what in (("--steps", int, "training steps"), ("--batch-size", int, "global batch in tokens"),
                             ("--lr", float, "peak learning rate"), ("--seed", int, "seed of init and model choice"),
                             ("--checkpoint-every", int, "steps between checkpoints (0: only at the end)"),
                             ("--log-every", int, "steps between logged R² / dead-latent entries")):
        p.add_argument(flag, type=kind, help=f"{what} (default: the preset's)")
    p.add_argument("--zoo", type=Path, metavar="DIR",
                   help="trained toy-zoo folder (usae.data.toyzoo) for toy backbones")
    p.add_argument("--random-weights", action="store_true", help="randomly initialised backbones (tests, no download)")
    p.add_argument("--bf16", action="store_true", help="run the backbones under bfloat16 autocast (--images)")
    p.add_argument("--block-images", type=int, metavar="N",
                   help="images per backbone forward and shuffle block (default: the preset's extraction batch)")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto", help="default: nccl with CUDA")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if available")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _backbone(name: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    from usae.config import BackboneSpec
    from usae.data.zoo import get_entry, load_backbone

    if get_entry(name).toy and not args.random_weights:
        if args.zoo is None:
            raise ValueError(f"backbone {name!r} is a toy model: give its trained weights with --zoo DIR (an "
                             "Experiment's zoo folder) or use --random-weights")
        from usae.data.toyzoo import load_toy_backbone

        return load_toy_backbone(name, args.zoo).to(device).eval()
    return load_backbone(BackboneSpec(name, pretrained=not args.random_weights)).to(device).eval()


def _source(args: argparse.Namespace, cfg: Any, rank: int, device: torch.device) -> tuple[Any, dict, tuple]:
    """(training source, name -> Standardisation, model names) of the command line."""
    if args.store is not None:
        from usae.data.store import ActivationStore

        store = ActivationStore.open(args.store)
        names = tuple(args.models or store.models)
        unknown = [n for n in names if n not in store.dims]
        if unknown or args.split not in store.splits:
            raise ValueError(f"--models {list(names)} / --split {args.split!r} are not valid for this store; it has "
                             f"models {list(store.models)} and splits {list(store.splits)}")
        return store, store.stats, names
    from usae.data.sources import folder_sources
    from usae.data.standardisation import Standardisation

    ex = cfg.extract
    names = tuple(args.models or cfg.model_names)
    backbones = {n: _backbone(n, args, device) for n in names}
    kwargs = dict(standardise=ex.standardise, n_stats_images=ex.n_stats_images, block_images=args.block_images
                  or ex.batch_size, autocast=torch.bfloat16 if args.bf16 else None,
                  progress=rank == 0 and not args.no_progress)
    sources = folder_sources(args.images, ex.image_size, ex.n_val_images)
    payload = [None]
    if rank == 0:  # fit the standardisation once, share it
        payload = [{n: s.to_dict() for n, s in OnlineSource(backbones, sources, ex.grid, **kwargs).stats.items()}]
    dist.broadcast_object_list(payload, src=0)
    stats = {n: Standardisation.from_dict(d) for n, d in payload[0].items()}
    return OnlineSource(backbones, sources, ex.grid, stats=stats, **kwargs), stats, names


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring and ``python -m usae.train.distributed --help``)."""
    from usae.config import preset

    args = _parser().parse_args(argv)
    cfg = preset(args.preset)
    changes = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "checkpoint_every", "log_every")
               if getattr(args, k) is not None}
    train_cfg = cfg.train.replace(**changes)
    created = not (dist.is_available() and dist.is_initialized())
    rank, world, device = init_distributed(args.backend, args.device)
    try:
        source, stats, names = _source(args, cfg, rank, device)
        dims = {n: source.dims[n] for n in names}
        torch.manual_seed(train_cfg.seed)
        model = UniversalSAE(dims, cfg.usae.width(dims), cfg.usae.k, encoder=cfg.usae.encoder,
                             init=cfg.usae.init)
        for n in names:
            model.set_standardisation(n, stats[n].mean, stats[n].std)
        trainer = DistributedTrainer(model.to(device), train_cfg, checkpoint_dir=args.out / "checkpoints",
                                     progress=not args.no_progress, split=args.split)
        trainer.resume()
        first, began = trainer.step, time.perf_counter()
        history = trainer.fit(source)
        seconds = time.perf_counter() - began
        if rank == 0:
            run = {"world_size": world, "device": str(device), "steps": trainer.step - first, "seconds": seconds,
                   "tokens_per_s": (trainer.step - first) * train_cfg.batch_size / max(seconds, 1e-9),
                   "source": "store" if args.store is not None else "images", "preset": args.preset}
            if isinstance(source, OnlineSource):
                run["backbone_tokens_per_s_per_rank"] = source.throughput()
            model.save(args.out / "model.safetensors")
            tmp = args.out / f".history.json.tmp-{os.getpid()}"
            history.run = run
            tmp.write_text(json.dumps(history.to_dict()))
            os.replace(tmp, args.out / "history.json")
            print(f"trained {run['steps']} steps on {world} rank(s) in {seconds:.1f} s "
                  f"({run['tokens_per_s']:.3g} tokens/s); wrote {args.out}", flush=True)
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
