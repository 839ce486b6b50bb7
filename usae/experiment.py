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

import torch

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
        """``split -> ImageSource`` for extraction: the toy world's splits (with per-patch truth), or an
        image folder's ``train``/``val`` (subfolders if present, else a seeded split of one folder)."""
        cfg = self.config.extract
        if self.is_toy:
            return {split: toy_source(self.world, split, n) for split, n in (
                ("train", cfg.n_train_images), ("val", cfg.n_val_images),
                ("ood_combos", cfg.n_val_images), ("ood_textures", cfg.n_val_images))}
        return folder_sources(Path(self.config.source), cfg.image_size, cfg.n_val_images)

    def store(self):
        """The ``ActivationStore`` of every backbone over every split (extracted on first use)."""
        if "store" not in self._cache:
            from usae.extract import extract_store
            from usae.store import ActivationStore

            key = self._acts_key()

            def build(tmp: Path) -> None:
                extract_store(self.backbones(), self.image_sources(), self.config.extract, tmp / "store",
                              meta={"key": _stable_hash(key)}, progress=self.progress)

            folder = self.artifact("acts", key, build)
            self._cache["store"] = ActivationStore.open(folder / "store", expect_meta={"key": _stable_hash(key)})
        return self._cache["store"]

    # -- universal and independent SAEs ---------------------------------------------------------------------
    def _acts_key(self) -> dict[str, Any]:
        return self._key("source", "backbones", "extract", *(("toy", "zoo") if self.is_toy else ()))

    def _trained(self, stage: str, names: tuple[str, ...], changes: dict[str, Any]) -> Path:
        from usae.model import UniversalSAE
        from usae.train import Trainer

        train_cfg = self.config.train.replace(**changes)
        key = {"acts": self._acts_key(), "models": list(names), "usae": self.config.usae.to_dict(),
               "train": train_cfg.to_dict()}

        def build(tmp: Path) -> None:
            store = self.store()
            dims = {n: store.dims[n] for n in names}
            usae_cfg = self.config.usae
            torch.manual_seed(train_cfg.seed)
            model = UniversalSAE(dims, usae_cfg.width(self.store().dims), usae_cfg.k, encoder=usae_cfg.encoder)
            for n in names:
                model.set_standardisation(n, store.stats[n].mean, store.stats[n].std)
            started = time.perf_counter()
            history = Trainer(model, train_cfg, progress=self.progress).fit(store)
            history["seconds"] = time.perf_counter() - started
            model.save(tmp / "model.safetensors")
            (tmp / "history.json").write_text(json.dumps(history))

        return self.artifact(stage, key, build)

    def usae(self, **train_changes: Any):
        """The ``UniversalSAE`` trained on the store's train split (eval mode); ``train_changes`` replace
        fields of the config's ``TrainConfig`` (e.g. ``update="joint"``), each variant cached separately."""
        from usae.model import UniversalSAE

        folder = self._trained("usae", self.config.model_names, train_changes)
        return UniversalSAE.load(folder / "model.safetensors").eval()

    def usae_history(self, **train_changes: Any) -> dict[str, Any]:
        """The training history of ``usae(**train_changes)``: per-step losses, logged R² matrices, dead latents."""
        folder = self._trained("usae", self.config.model_names, train_changes)
        return json.loads((folder / "history.json").read_text())

    def independent_sae(self, name: str, **train_changes: Any):
        """A single-model SAE of backbone ``name``: the same class (M = 1), width, k and recipe as the USAE.

        Its seed defaults to the USAE's seed + 1: with the same seed it would start from exactly the USAE's
        initial atoms for that model, and comparing the two dictionaries (chapter 7) would be trivial."""
        from usae.model import UniversalSAE

        train_changes.setdefault("seed", self.config.train.seed + 1)
        if name not in self.config.model_names:
            raise ValueError(f"independent_sae: name = {name!r} is not valid; expected one of "
                             f"{list(self.config.model_names)}")
        folder = self._trained("sae", (name,), train_changes)
        return UniversalSAE.load(folder / "model.safetensors").eval()


TRUTH_FACTORS = ("shape", "color", "texture", "bg_color", "object")


def toy_source(world, split: str, n_images: int):
    """An ``ImageSource`` over the first ``n_images`` of a toy-world split, yielding per-patch truth labels."""
    from usae.extract import ImageSource

    def load(start: int, count: int):
        batch = world.batch(split, start, count)
        return batch.images, {f: batch.patch_labels[f] for f in TRUTH_FACTORS}

    return ImageSource(n_images, load)


def folder_sources(root: Path, image_size: int, n_val: int) -> dict:
    """``train``/``val`` sources of an image folder. With ``train/`` and ``val/`` subfolders (ImageNet's
    layout) those are used, the training images in a seeded random order so that the first images (used
    for standardisation statistics) are a random sample; otherwise the folder's images are shuffled
    (seeded) and the first ``n_val`` become ``val``."""
    from usae.extract import ImageFolder, ImageSource, as_source

    if not root.is_dir():
        raise ValueError(f"source = {str(root)!r} is not a folder of images; give 'toy' or an existing folder")
    if (root / "train").is_dir() and (root / "val").is_dir():
        return {"train": as_source(ImageFolder(root / "train", image_size=image_size, shuffle=True, seed=0)),
                "val": as_source(ImageFolder(root / "val", image_size=image_size))}
    folder = ImageFolder(root, image_size=image_size, shuffle=True, seed=0)
    if len(folder) < 2:
        raise ValueError(f"{root} holds {len(folder)} image(s); need at least 2 to split into train and val")
    n_val = min(n_val, len(folder) // 2)
    return {"val": ImageSource(n_val, lambda s, c: folder.load(range(s, s + c))),
            "train": ImageSource(len(folder) - n_val, lambda s, c: folder.load(range(n_val + s, n_val + s + c)))}
