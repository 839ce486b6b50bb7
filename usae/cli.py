"""The ``usae`` command line: ``usae {extract,train,bench,book,seeds} [options]`` (or ``python -m usae.cli``).

::

    usae extract --preset book                     # toy zoo + activation store
    usae train --preset paper --images /data/imagenet --set train.checkpoint_every=10000
    usae train --config my_config.json --runs /scratch/runs --set train.steps=2000
    usae bench [--quick] [step|store|...]          # speed against references timed in the same run
    usae bench --gpu-check [--dry-run]             # one command for a lent GPU: kernels, bf16, step, peers, m sweep
    usae book [--preset smoke]                     # execute every chapter and render the HTML book
    usae seeds --preset book --seeds 0-4 --jobs 2  # every chapter's claims per seed -> the seeds table
    usae r2 RUN                                    # the cross-model R² matrix of a trained run
    usae concepts RUN --top 20                     # entropy, co-fire proportion, energy of its top concepts
    usae gallery RUN 42 --out concept42.html       # one concept's top images through every model

RUN is the folder ``usae train`` printed.

``extract`` and ``train`` get-or-compute the artifacts of :class:`usae.experiment.Experiment` and print the artifact's
folder. Run the same command again after an interruption (Ctrl-C, a crash, ``kill -9``) and it continues:
the extraction keeps its completed, checksum-verified shards and recomputes the rest; training resumes from
its last checkpoint (written every ``train.checkpoint_every`` steps; 0 writes none before the end) and ends
with the same weights, bit for bit, as an uninterrupted run with the same seed.

``--set SECTION.FIELD=VALUE`` changes one field of the configuration (``VALUE`` is read as JSON, else as a
string), e.g. ``--set train.steps=500 --set usae.k=16 --set device=cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from usae._checks import positive_int
from usae.config import PRESETS, SEED_ENV, ExperimentConfig, preset, seed_from_env

__all__ = ["main", "load_config", "apply_settings"]


def apply_settings(config: ExperimentConfig, settings: Sequence[str]) -> ExperimentConfig:
    """``config`` with each ``"section.field=value"`` (or ``"field=value"``) of ``settings`` applied."""
    data = config.to_dict()
    for item in settings:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set {item!r} is not valid; expected SECTION.FIELD=VALUE, e.g. train.steps=500")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node, keys = data, path.split(".")
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                where = ".".join(keys[:depth]) or "the configuration"
                valid = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"--set {item!r}: {key!r} is not a field of {where}; valid fields are {valid}")
            if depth == len(keys) - 1:
                node[key] = value
            else:
                node = node[key]
        if keys[0] == "zoo" and data.get("source") == "toy":  # the toy backbones follow zoo.models
            data["backbones"] = []
    return ExperimentConfig.from_dict(data)


def load_config(preset_name: str | None, config_file: str | Path | None,
                settings: Sequence[str] = ()) -> ExperimentConfig:
    """The configuration named by a preset or read from a JSON file (``ExperimentConfig.to_dict()``), then
    ``settings`` applied. The preset defaults to ``$USAE_PRESET``, else ``"book"``."""
    if config_file is not None:
        if preset_name is not None:
            raise ValueError("give either --preset or --config, not both")
        path = Path(config_file)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"--config {str(path)!r}: no such file") from None
        except ValueError as err:
            raise ValueError(f"--config {str(path)!r} is not valid JSON ({err})") from None
        config = ExperimentConfig.from_dict(data)
    else:
        config = preset(preset_name or os.environ.get("USAE_PRESET", "book"))
    return apply_settings(config, settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usae", description="Universal Sparse Autoencoders: the pipeline, the "
                                     "benchmarks and the book.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{extract,train,r2,concepts,gallery,bench,book,seeds}")
    for name, text in (("extract", "train the toy zoo if needed and extract the activation store"),
                       ("train", "extract if needed, then train the USAE (resumes from its last checkpoint)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--preset", default=None, help=f"one of {list(PRESETS)} (default: $USAE_PRESET or book)")
        p.add_argument("--config", default=None, metavar="FILE", help="JSON file of an ExperimentConfig")
        p.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="change one configuration field (repeatable)")
        p.add_argument("--runs", default=None, help="artifact cache folder (default: $USAE_RUNS or data/runs)")
        p.add_argument("--images", default=None, help="image folder for configs with real backbones")
        p.add_argument("--shard-mb", type=float, default=1024.0, help="store shard size in MiB (default 1024)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--seed", default=None, help="pipeline seed: world, zoo, USAE, SAEs (default: $USAE_SEED or "
                       "the config's seeds)")
    for name, text in (("r2", "print the cross-model R² matrix of a trained run (row: encoder, column: decoder)"),
                       ("concepts", "print the most energetic concepts of a run: entropy, co-fire proportion, energy"),
                       ("gallery", "write one concept's top images, with every model's heatmap, to an HTML file")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("run", type=Path, help="the run folder that `usae train` printed")
        if name == "gallery":
            p.add_argument("concept", type=int, help="the concept id")
            p.add_argument("--images", type=int, default=6, help="how many top images (default 6)")
            p.add_argument("--out", type=Path, default=None, help="HTML file (default: concept-<id>.html)")
        if name == "concepts":
            p.add_argument("--top", type=int, default=20, help="how many concepts, most energetic first (default 20)")
        p.add_argument("--split", default="val", help="the store split to analyse (default: val)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    text = "speed benchmarks, as ratios against references timed in the same run"
    p = sub.add_parser("bench", help=text, description=text)
    p.add_argument("entries", nargs="*", help="entries to run (default: all of usae.perf.runner.ENTRIES)")
    p.add_argument("--quick", action="store_true", help="small shapes, for a fast check")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="device of the step entry (default: $USAE_BENCH_DEVICE or auto)")
    p.add_argument("--gpu-check", action="store_true",
                   help="instead of the entries: the GPU check (Triton kernels on CUDA, bf16, the step at the "
                        "paper's shape, peers, an m sweep; about 8 minutes) -> <runs>/bench/gpu-check-*.json")
    p.add_argument("--dry-run", action="store_true", help="with --gpu-check: tiny shapes, any device")
    p.add_argument("--out", type=Path, default=None, help="with --gpu-check: the JSON file to write")
    text = "execute every chapter afresh and render the HTML book"
    p = sub.add_parser("book", help=text, description=text)
    p.add_argument("--output", type=Path, default=None, help="folder to hold _build/ (default: the repo root)")
    p.add_argument("--preset", choices=PRESETS, default=None, help="override USAE_PRESET for every chapter")
    text = "run the chapters for several seeds and write the seeds table"
    p = sub.add_parser("seeds", help=text, description=text)
    p.add_argument("--preset", choices=PRESETS, default="book")
    p.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,2,5 (default 0-4)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at a time, each with cores/jobs threads")
    p.add_argument("--chapters", default=None, help="comma-separated chapter names (default: all but timing)")
    p.add_argument("--table", type=Path, default=None, help="output JSON (default data/seeds/<preset>.json)")
    p.add_argument("--work", type=Path, default=None, help="claim records and executed notebooks")
    p.add_argument("--check", action="store_true", help="exit 1 when a claim fails for some seed")
    p.add_argument("--gather", type=int, default=None, metavar="THREADS",
                   help="do not run: gather the records under --work, which ran with THREADS threads each")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    return parser


def _bench(args: argparse.Namespace) -> int:
    if args.device is not None:
        if args.device == "cuda" and not torch_cuda_available():
            raise ValueError("--device cuda is not valid here: torch sees no CUDA device; use cpu or auto")
        os.environ["USAE_BENCH_DEVICE"] = args.device
    if args.gpu_check:
        if args.entries or args.quick:
            raise ValueError("--gpu-check runs its own parts; it is not valid with entries or --quick")
        from usae.perf.gpu_check import gpu_check

        report = gpu_check(args.device or ("cpu" if args.dry_run else "cuda"), dry_run=args.dry_run, out=args.out)
        print(report.summary())
        return 0 if report.ok else 1
    if args.dry_run or args.out is not None:
        raise ValueError("--dry-run and --out are only valid with --gpu-check")
    from usae.perf.rows import format_table
    from usae.perf.runner import run

    rows = run(args.entries, quick=args.quick)
    print(format_table(rows))
    failed = [r for r in rows if r["passed"] is False]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows meet their target" if rows else "no rows")
    return 1 if failed else 0


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _book(args: argparse.Namespace) -> int:
    from usae.book import build

    build(args.output, args.preset)
    return 0


def _seeds(args: argparse.Namespace) -> int:
    from usae.book import chapters, run_seed, seeds
    from usae.claims import parse_seeds
    from usae.config import repo_root

    seed_list = parse_seeds(args.seeds)
    names = None if args.chapters is None else [n.strip() for n in args.chapters.split(",") if n.strip()]
    if args.no_table:  # one worker of a --jobs N run
        root = repo_root()
        work = args.work or root / "data" / "runs" / f"seeds-{args.preset}"
        for seed in seed_list:
            run_seed(seed, args.preset, chapters(root, names), work / "claims", work / "executed", root)
    else:
        seeds(seed_list, args.preset, args.jobs, names, args.table, args.work, check=args.check,
              run=args.gather is None, threads=args.gather)
    return 0


def _analysis(args: argparse.Namespace) -> int:
    from usae.experiment import load_run
    from usae.stats import concepts, firing
    from usae.stats.reconstruction import r2_matrix

    run = load_run(args.run, progress=not args.quiet)
    store, names = run.store(), list(run.model.names)
    if args.command == "r2":
        matrix = r2_matrix(run.model, store, split=args.split)
        width = max(len(n) for n in names) + 2
        print("encoder \\ decoder".ljust(width) + "".join(n.rjust(width) for n in names))
        for i, n in enumerate(names):
            print(n.ljust(width) + "".join(f"{float(v):{width}.3f}" for v in matrix[i]))
        return 0
    stats = firing.firing_stats(run.model, store, split=args.split, progress=not args.quiet)
    if args.command == "concepts":
        positive_int("--top", args.top)
        print("concept  entropy    energy  " + "  ".join(f"CFP {n}" for n in names) + "  " +
              "  ".join(f"fires {n}" for n in names))
        for row in concepts.concept_rows(stats, top=args.top):
            print(f"{row.concept:7d}  {row.entropy:7.3f}  {row.energy:8.4g}  "
                  + "  ".join(f"{row.cfp[n]:{len(n) + 4}.3f}" for n in names) + "  "
                  + "  ".join(f"{row.fires[n]:{len(n) + 6}d}" for n in names))
        return 0
    from usae.stats import galleries
    from usae.viz import concepts as figures

    if not 0 <= args.concept < run.model.n_latents:
        raise ValueError(f"concept {args.concept} is not valid; expected an id in [0, {run.model.n_latents})")
    positive_int("--images", args.images)
    gallery = galleries.galleries(run.model, store, run.experiment.images, [args.concept], args.split,
                                  args.images)[args.concept]
    fig = figures.gallery_figure(gallery.images, gallery.heatmaps, captions=gallery.captions,
                                 title=figures.concept_title(stats, args.concept))
    out = args.out or Path(f"concept-{args.concept}.html")
    fig.write_html(out, include_plotlyjs=True)  # plotly.js inside the file: opens offline
    print(out)
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from usae.experiment import Experiment

    if not args.shard_mb > 0:
        raise ValueError(f"--shard-mb {args.shard_mb} is not valid; expected a size > 0")
    config = load_config(args.preset, args.config, args.settings)
    if args.seed is not None and not str(args.seed).isdigit():
        raise ValueError(f"--seed {args.seed} is not valid; expected an integer >= 0")
    seed = int(args.seed) if args.seed is not None else (seed_from_env() if os.environ.get(SEED_ENV) else None)
    exp = Experiment(config, runs=args.runs, progress=not args.quiet, images=args.images,
                     shard_bytes=max(1, int(args.shard_mb * (1 << 20))), seed=seed)
    print(exp.store().path if args.command == "extract" else exp.usae_dir())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 bad input or failure, 2 usage error)."""
    args = _parser().parse_args(argv)
    command = {"extract": _pipeline, "train": _pipeline, "bench": _bench, "book": _book, "seeds": _seeds,
               "r2": _analysis, "concepts": _analysis, "gallery": _analysis}
    try:
        return command[args.command](args)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
