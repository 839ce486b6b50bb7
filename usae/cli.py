"""Command line for the long-running stages: ``python -m usae.cli {extract,train} [options]``.

::

    python -m usae.cli extract --preset book                     # toy zoo + activation store
    python -m usae.cli train --preset paper --images /data/imagenet --set train.checkpoint_every=10000
    python -m usae.cli train --config my_config.json --runs /scratch/runs --set train.steps=2000

Both commands get-or-compute the artifacts of :class:`usae.experiment.Experiment` and print the artifact's
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
from pathlib import Path
from typing import Any, Sequence

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
    parser = argparse.ArgumentParser(prog="python -m usae.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 bad input or failure, 2 usage error)."""
    args = _parser().parse_args(argv)
    from usae.experiment import Experiment

    try:
        if not args.shard_mb > 0:
            raise ValueError(f"--shard-mb {args.shard_mb} is not valid; expected a size > 0")
        config = load_config(args.preset, args.config, args.settings)
        if args.seed is not None and not str(args.seed).isdigit():
            raise ValueError(f"--seed {args.seed} is not valid; expected an integer >= 0")
        seed = int(args.seed) if args.seed is not None else (seed_from_env() if os.environ.get(SEED_ENV) else None)
        exp = Experiment(config, runs=args.runs, progress=not args.quiet, images=args.images,
                         shard_bytes=max(1, int(args.shard_mb * (1 << 20))), seed=seed)
        folder = exp.store().path if args.command == "extract" else exp.usae_dir()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
