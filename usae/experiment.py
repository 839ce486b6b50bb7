"""``Experiment(config)``: every artifact of the book, computed on first request and cached on disk.

Artifacts live under the runs folder (``data/runs`` or ``$USAE_RUNS``) as ``<stage>-<hash>/``, where the hash
covers exactly the configuration the stage depends on: changing the USAE's width does not retrain the toy
zoo. A stage is built in a temporary sibling folder and renamed into place when complete, so an interrupted
run never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from usae.config import ExperimentConfig, preset
from usae.paths import runs_dir


def _stable_hash(data: Any, length: int = 10) -> str:
    import hashlib

    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


class Experiment:
    """Get-or-compute access to the toy world, the backbones, the activation store and what follows.

    ``config``: an ``ExperimentConfig`` or a preset name (``"smoke"``, ``"book"``, ``"paper"``).
    """

    def __init__(self, config: ExperimentConfig | str = "book", runs: str | Path | None = None,
                 progress: bool = True) -> None:
        self.config = preset(config) if isinstance(config, str) else config
        if not isinstance(self.config, ExperimentConfig):
            raise ValueError(f"config = {config!r} is not valid; expected an ExperimentConfig or a preset name")
        self.runs = Path(runs).expanduser() if runs is not None else runs_dir()
        self.runs.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        c = self.config
        return f"Experiment(name={c.name!r}, source={c.source!r}, models={list(c.model_names)}, runs={str(self.runs)!r})"

    # -- the artifact mechanism -------------------------------------------------------------------------
    def artifact(self, stage: str, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
        """The folder ``<runs>/<stage>-<hash(key)>``, built by ``build(tmp_folder)`` if it does not exist yet."""
        final = self.runs / f"{stage}-{_stable_hash(key)}"
        if final.is_dir():
            return final
        tmp = self.runs / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        started = time.perf_counter()
        try:
            build(tmp)
            (tmp / "key.json").write_text(json.dumps({"stage": stage, "key": key,
                                                      "seconds": time.perf_counter() - started}, indent=1))
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # someone else finished first: keep theirs
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _key(self, *parts: str) -> dict[str, Any]:
        d = self.config.to_dict()
        return {p: d[p] for p in parts}

    # -- toy world and zoo ------------------------------------------------------------------------------
    @property
    def is_toy(self) -> bool:
        return self.config.source == "toy"

    @property
    def world(self):
        """The ``ToyWorld`` of this experiment."""
        if "world" not in self._cache:
            from usae.toyworld import ToyWorld

            self._cache["world"] = ToyWorld(self.config.toy)
        return self._cache["world"]

    def zoo_dir(self) -> Path:
        """Folder with the trained toy zoo (weights + ``report.json``); trains it on first use."""
        if not self.is_toy:
            raise ValueError(f"source = {self.config.source!r}: only the toy world has a trained zoo")
        from usae.toyzoo import train_toy_zoo

        def build(tmp: Path) -> None:
            train_toy_zoo(self.world, self.config.zoo, tmp, progress=self.progress)

        return self.artifact("zoo", self._key("toy", "zoo"), build)

    def zoo_report(self) -> dict[str, Any]:
        """Held-out metrics of every toy model on its task(s), with chance levels."""
        return json.loads((self.zoo_dir() / "report.json").read_text())

    def backbones(self) -> dict:
        """``name -> usae.zoo.Backbone`` in eval mode, in the config's model order."""
        if "backbones" not in self._cache:
            from usae.zoo import load_backbone

            out = {}
            for spec in self.config.backbones:
                if self.is_toy:
                    from usae.toyzoo import load_toy_backbone

                    out[spec.name] = load_toy_backbone(spec.name, self.zoo_dir(), layer=spec.layer)
                else:
                    out[spec.name] = load_backbone(spec)
                out[spec.name].eval()
            self._cache["backbones"] = out
        return self._cache["backbones"]

    # -- activations --------------------------------------------------------------------------------------
    def image_sources(self) -> dict:
        """``split -> image source`` for extraction: the toy world's splits, or an image folder's train/val."""
        from usae import extract

        cfg = self.config.extract
        if self.is_toy:
            w = self.world
            return {
                "train": extract.ToySplit(w, "train", cfg.n_train_images),
                "val": extract.ToySplit(w, "val", cfg.n_val_images),
                "ood_combos": extract.ToySplit(w, "ood_combos", cfg.n_val_images),
                "ood_textures": extract.ToySplit(w, "ood_textures", cfg.n_val_images),
            }
        return extract.folder_splits(Path(self.config.source), cfg)

    def store(self):
        """The ``ActivationStore`` of every backbone over every split (extracted on first use)."""
        if "store" not in self._cache:
            from usae.extract import extract_store
            from usae.store import ActivationStore

            key = self._key("source", "backbones", "extract", *(("toy", "zoo") if self.is_toy else ()))

            def build(tmp: Path) -> None:
                extract_store(self.backbones(), self.image_sources(), self.config.extract, tmp / "store",
                              meta={"key": _stable_hash(key)}, progress=self.progress)

            folder = self.artifact("acts", key, build)
            self._cache["store"] = ActivationStore.open(folder / "store", expect_meta={"key": _stable_hash(key)})
        return self._cache["store"]
