"""``Experiment(config)``: every artifact of the book, computed on first request and cached on disk.

Artifacts live under the runs folder (``data/runs`` or ``$USAE_RUNS``) as ``<stage>-<hash>/``, where the hash
covers exactly the configuration the stage depends on: changing the USAE's width does not retrain the toy
zoo. A stage is built in a temporary sibling folder and renamed into place when complete, so an interrupted
run never leaves a folder that looks finished; one process at a time builds a given artifact (a lock file).
The long stages resume after an interruption, even ``kill -9``: the extraction keeps the completed shards of
its work folder ``.acts-<hash>.store-work`` and training restarts from its last checkpoint in
``.<stage>-<hash>.checkpoints`` (when ``train.checkpoint_every`` > 0), ending with the same weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from usae._checks import positive_int
from usae._io import FileLock
from usae.config import ExperimentConfig, preset, runs_dir, with_seed
from usae.data.sources import folder_sources, toy_source, with_images
from usae.side_by_side import Training, train_in_workers

if TYPE_CHECKING:
    from usae.train.history import TrainHistory


def _runs_folder(runs: str | Path | None) -> Path:
    """The artifact cache folder, created if needed; ValueError naming the option when it cannot be used."""
    path = Path(runs).expanduser() if runs is not None else runs_dir(create=False)
    where = "runs (--runs, $USAE_RUNS)"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{where} = {str(path)!r} is a file; expected a folder for the artifact cache")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{where} = {str(path)!r} cannot be written ({err.strerror}); give a writable folder "
                         "with --runs DIR or USAE_RUNS=DIR") from None
    return path


def _stable_hash(data: Any, length: int = 10) -> str:
    import hashlib

    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


class Experiment:
    """Get-or-compute access to the toy world, the backbones, the activation store and what follows.

    ``config``: an ``ExperimentConfig`` or a preset name (``"smoke"``, ``"book"``, ``"paper"``). ``images``:
    an image folder replacing the config's ``source`` (the ``paper`` preset's ImageNet root, holding
    ``train/`` and ``val/``); only for configs with real backbones, not the toy world. Backbones and SAEs
    live on ``config.device`` (``"auto"``: CUDA when available). ``shard_bytes``: the store's shard size (also
    how much an interrupted extraction may have to redo). ``seed``: the pipeline seed (``usae.config.with_seed``:
    world, zoo, USAE, independent SAEs); None keeps the config's seeds. Bad settings (unknown backbone, k > m, a
    missing GPU) fail here, before anything is written.
    """

    def __init__(self, config: ExperimentConfig | str = "book", runs: str | Path | None = None,
                 progress: bool = True, *, images: str | Path | None = None, shard_bytes: int = 1 << 30,
                 seed: int | None = None) -> None:
        self.config = preset(config) if isinstance(config, str) else config
        if not isinstance(self.config, ExperimentConfig):
            raise ValueError(f"config = {config!r} is not valid; expected an ExperimentConfig or a preset name")
        if images is not None:
            self.config = with_images(self.config, images)
        if seed is not None:
            self.config = with_seed(self.config, seed)
        from usae.data.zoo import get_entry  # ValueError listing the valid names for an unknown backbone

        if not self.is_toy:
            toys = [n for n in self.config.model_names if get_entry(n).toy]
            if toys:
                raise ValueError(f"backbones {toys} are toy models, which only run on the toy world; an image "
                                 f"folder (source = {self.config.source!r}) needs real zoo models, e.g. the "
                                 "paper preset's")
        else:
            real = [n for n in self.config.zoo.models if not get_entry(n).toy]
            if real:
                raise ValueError(f"zoo.models = {list(self.config.zoo.models)} is not valid: {real} are not toy "
                                 "models; the toy world trains only toy backbones such as 'toy_vit', "
                                 "'toy_convnext' and 'toy_mixer'")
        if all(spec.layer is None for spec in self.config.backbones):  # widths known: check k <= m before any work
            self.config.usae.width({s.name: get_entry(s.name).dim for s in self.config.backbones})
        _ = self.device  # fail now (before anything is written) when config.device names a missing GPU
        self.shard_bytes = positive_int("shard_bytes", shard_bytes)
        self.runs = _runs_folder(runs)
        self.progress = progress
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        c = self.config
        return (f"Experiment(name={c.name!r}, source={c.source!r}, models={list(c.model_names)}, "
                f"runs={str(self.runs)!r})")

    @property
    def device(self) -> torch.device:
        """Where backbones and SAEs run: ``config.device``, with ``"auto"`` = CUDA when available, else CPU."""
        want = self.config.device
        if want == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if want == "cuda" and not torch.cuda.is_available():
            raise ValueError("ExperimentConfig.device = 'cuda' is not valid on this machine: torch sees no CUDA "
                             "device; use device='auto' (CUDA when available, else CPU) or 'cpu'")
        return torch.device(want)

    # -- the artifact mechanism -------------------------------------------------------------------------
    def artifact(self, stage: str, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
        """The folder ``<runs>/<stage>-<hash(key)>``, built by ``build(tmp_folder)`` if it does not exist yet."""
        final = self.runs / f"{stage}-{_stable_hash(key)}"
        if final.is_dir():
            return final
        # one builder at a time (a second process waits, then finds the artifact); the OS drops the lock of a
        # killed process, whose temp folder is then removed here
        lock = FileLock(self.runs / f".{final.name}.lock").acquire()
        try:
            if final.is_dir():
                return final
            for stale in self.runs.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = self.runs / f".{final.name}.tmp-{os.getpid()}"
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
        finally:
            lock.release(remove=True)
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
        """The ``ToyWorld`` of this experiment (ValueError for an image folder: use :meth:`images`)."""
        if not self.is_toy:
            raise ValueError(f"source = {self.config.source!r} is an image folder, not the toy world; read its "
                             "images with Experiment.images(split, ids)")
        if "world" not in self._cache:
            from usae.data.toyworld import ToyWorld

            self._cache["world"] = ToyWorld(self.config.toy)
        return self._cache["world"]

    def zoo_dir(self) -> Path:
        """Folder with the trained toy zoo (weights + ``report.json``); trains it on first use."""
        if not self.is_toy:
            raise ValueError(f"source = {self.config.source!r}: only the toy world has a trained zoo")
        from usae.data.toyzoo_build import train_toy_zoo

        def build(tmp: Path) -> None:
            train_toy_zoo(self.world, self.config.zoo, tmp, progress=self.progress)

        return self.artifact("zoo", self._key("toy", "zoo"), build)

    def zoo_report(self) -> dict[str, Any]:
        """Held-out metrics of every toy model on its task(s), with chance levels."""
        return json.loads((self.zoo_dir() / "report.json").read_text())

    def backbones(self) -> dict:
        """``name -> usae.data.zoo.Backbone`` in eval mode, in the config's model order."""
        if "backbones" not in self._cache:
            from usae.data.zoo import load_backbone

            out = {}
            for spec in self.config.backbones:
                if self.is_toy:
                    from usae.data.toyzoo import load_toy_backbone

                    out[spec.name] = load_toy_backbone(spec.name, self.zoo_dir(), layer=spec.layer)
                else:
                    out[spec.name] = load_backbone(spec)
                out[spec.name].to(self.device).eval()
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

    def images(self, split: str, ids) -> torch.Tensor:
        """Images ``[n, 3, H, W]`` in [0, 1] of ``split`` at image indices ``ids`` (store order, as the
        store's rows and the galleries' image ids): the toy world's, or the image folder's."""
        idx = [int(i) for i in torch.as_tensor(ids, dtype=torch.int64).reshape(-1)]
        if not idx or min(idx) < 0:
            raise ValueError(f"ids = {idx}: expected one or more image indices >= 0")
        if self.is_toy:
            return torch.cat([self.world.batch(split, i, 1).images for i in idx])
        if "sources" not in self._cache:
            self._cache["sources"] = self.image_sources()
        sources = self._cache["sources"]
        if split not in sources:
            raise ValueError(f"split = {split!r} is not valid; expected one of {sorted(sources)}")
        src = sources[split]
        if max(idx) >= src.n_images:
            raise ValueError(f"ids reach image {max(idx)} of split {split!r}, which has {src.n_images} images")
        loaded = [src.load(i, 1) for i in idx]
        return torch.cat([x[0] if isinstance(x, tuple) else x for x in loaded])

    def store(self):
        """The ``ActivationStore`` of every backbone over every split (extracted on first use)."""
        if "store" not in self._cache:
            from usae.data.extract import extract_store
            from usae.data.store import ActivationStore

            key = self._acts_key()
            # the unfinished store lives beside the artifact under a stable name: an interrupted extraction
            # (even kill -9) resumes there, keeping its completed shards; it becomes the artifact's store
            work = self.runs / f".acts-{_stable_hash(key)}.store-work"
            sources = None if (self.runs / f"acts-{_stable_hash(key)}").is_dir() else self.image_sources()

            def build(tmp: Path) -> None:
                extract_store(self.backbones(), sources or self.image_sources(), self.config.extract, tmp / "store",
                              meta={"key": _stable_hash(key)}, progress=self.progress, work_dir=work,
                              shard_bytes=self.shard_bytes)

            folder = self.artifact("acts", key, build)
            store = ActivationStore.open(folder / "store", expect_meta={"key": _stable_hash(key)})
            store.progress = self.progress
            self._cache["store"] = store
        return self._cache["store"]

    # -- universal and independent SAEs ---------------------------------------------------------------------
    def _acts_key(self) -> dict[str, Any]:
        return self._key("source", "backbones", "extract", *(("toy", "zoo") if self.is_toy else ()))

    def _usae_config(self, init: str | None = None):
        """The config's ``USAEConfig``, with another initialisation when ``init`` is given."""
        return self.config.usae if init is None else self.config.usae.replace(init=init)

    def _train_key(self, names: tuple[str, ...], changes: dict[str, Any],
                   init: str | None = None) -> tuple[Any, dict[str, Any]]:
        """(the TrainConfig with ``changes``, the artifact key of an SAE of ``names`` trained with it)."""
        train_cfg = self.config.train.replace(**changes)
        return train_cfg, {"acts": self._acts_key(), "models": list(names),
                           "usae": self._usae_config(init).to_dict(), "train": train_cfg.weights_dict()}

    def _initial(self, names: tuple[str, ...], train_cfg: Any, init: str | None = None):
        """The untrained SAE of ``names`` exactly as training starts it (seeded by ``train_cfg.seed``)."""
        from usae.core.model import UniversalSAE

        store, usae_cfg = self.store(), self._usae_config(init)
        torch.manual_seed(train_cfg.seed)
        model = UniversalSAE({n: store.dims[n] for n in names}, usae_cfg.width(store.dims), usae_cfg.k,
                             encoder=usae_cfg.encoder, init=usae_cfg.init)
        for n in names:
            model.set_standardisation(n, store.stats[n].mean, store.stats[n].std)
        return model.to(self.device)

    def initial_usae(self, *, init: str | None = None, **train_changes: Any):
        """The USAE of ``usae(init=..., **train_changes)`` before its first step (to see how far atoms moved)."""
        return self._initial(self.config.model_names, self.config.train.replace(**train_changes), init).eval()

    def _trained(self, stage: str, names: tuple[str, ...], changes: dict[str, Any], init: str | None = None) -> Path:
        from usae.train.trainer import Trainer

        train_cfg, key = self._train_key(names, changes, init)

        # trainer checkpoints (train_cfg.checkpoint_every > 0) live beside the artifact under a stable name, so
        # an interrupted run resumes where it stopped; removed once the artifact is complete
        checkpoints = self.runs / f".{stage}-{_stable_hash(key)}.checkpoints"
        interrupted = any(self.runs.glob(f".{stage}-{_stable_hash(key)}.tmp-*"))
        if interrupted and not train_cfg.checkpoint_every and not (self.runs / f"{stage}-{_stable_hash(key)}").is_dir():
            print(f"{stage}: an earlier training run was interrupted; train.checkpoint_every = 0 keeps no "
                  "checkpoints, so it starts again at step 0 (set train.checkpoint_every=N to resume instead)",
                  file=sys.stderr)
        label = "USAE" if len(names) > 1 else f"SAE {names[0]}"

        def build(tmp: Path) -> None:
            store = self.store()
            model = self._initial(names, train_cfg, init)
            started = time.perf_counter()
            trainer = Trainer(model, train_cfg, progress=self.progress, desc=label,
                              checkpoint_dir=checkpoints if train_cfg.checkpoint_every else None)
            history = trainer.fit(store)
            history.seconds = time.perf_counter() - started
            model.save(tmp / "model.safetensors")
            (tmp / "history.json").write_text(json.dumps(history.to_dict()))
            (tmp / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))  # for load_run

        folder = self.artifact(stage, key, build)
        shutil.rmtree(checkpoints, ignore_errors=True)
        return folder

    def usae(self, *, init: str | None = None, **train_changes: Any):
        """The ``UniversalSAE`` trained on the store's train split (eval mode); ``train_changes`` replace
        fields of the config's ``TrainConfig`` (e.g. ``update="joint"``) and ``init`` the decoder
        initialisation (e.g. the authors' ``"official"``), each variant cached separately."""
        from usae.core.model import UniversalSAE

        folder = self._trained("usae", self.config.model_names, train_changes, init)
        return UniversalSAE.load(folder / "model.safetensors", map_location=self.device).eval()

    def adopt_usae(self, folder: str | Path, **train_changes: Any) -> Path:
        """Install a USAE trained elsewhere as the artifact that ``usae(**train_changes)`` returns, so that the
        chapters use it instead of training one (e.g. a multi-GPU ``usae.train.distributed`` run over this
        experiment's store). ``folder`` holds ``model.safetensors`` and ``history.json`` (what
        ``usae.train.distributed`` writes to ``--out``). Checked against this experiment: model names in order,
        widths, m, k, encoder, the store's standardisation (relative tolerance 1e-3) and the number of steps
        in the history; the rest of the recipe cannot be read from the files and is trusted. Returns the
        artifact folder; ValueError if that artifact exists already."""
        from usae.core.model import UniversalSAE

        src = Path(folder)
        files = {name: src / name for name in ("model.safetensors", "history.json")}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise ValueError(f"folder = {str(src)!r} is not a trained USAE: missing {missing}")
        names = self.config.model_names
        train_cfg, key = self._train_key(names, train_changes)
        final = self.runs / f"usae-{_stable_hash(key)}"
        if final.exists():
            raise ValueError(f"this experiment already has a trained USAE for these settings at {final}; remove it "
                             "first to replace it")
        store, usae_cfg = self.store(), self.config.usae
        model = UniversalSAE.load(files["model.safetensors"])
        want = {"dims": {n: store.dims[n] for n in names}, "n_latents": usae_cfg.width(store.dims), "k": usae_cfg.k,
                "encoder": usae_cfg.encoder, "init": usae_cfg.init}
        got = model.config()
        if got != want or model.names != names:
            raise ValueError(f"{files['model.safetensors']} holds a USAE {got} (models {list(model.names)}); this "
                             f"experiment's is {want} (models {list(names)})")
        for n in names:
            stats = model.standardisation(n)
            ref = store.stats[n]
            if stats is None or not (torch.allclose(stats[0].cpu(), ref.mean, rtol=1e-3, atol=1e-5)
                                     and torch.allclose(stats[1].cpu(), ref.std, rtol=1e-3, atol=1e-5)):
                raise ValueError(f"{files['model.safetensors']}: the standardisation of {n!r} "
                                 f"({None if stats is None else [t.tolist() for t in stats]}) is not the store's "
                                 f"({ref.mean.tolist()}, {ref.std.tolist()}); it was trained on other activations")
        history = json.loads(files["history.json"].read_text())
        steps = len(history.get("loss", []))
        if steps != train_cfg.steps:
            raise ValueError(f"{files['history.json']} records {steps} steps; this experiment trains "
                             f"{train_cfg.steps} (pass the run's settings as train_changes, e.g. steps={steps})")

        def build(tmp: Path) -> None:
            shutil.copyfile(files["model.safetensors"], tmp / "model.safetensors")
            shutil.copyfile(files["history.json"], tmp / "history.json")
            (tmp / "adopted_from.txt").write_text(str(src.resolve()) + "\n")

        return self.artifact("usae", key, build)

    def usae_dir(self, **train_changes: Any) -> Path:
        """The artifact folder of ``usae(**train_changes)`` (``model.safetensors``, ``history.json``), trained
        on first use; with ``train.checkpoint_every`` > 0 an interrupted training resumes from its last checkpoint."""
        return self._trained("usae", self.config.model_names, train_changes)

    def usae_history(self, *, init: str | None = None, **train_changes: Any) -> TrainHistory:
        """The training history of ``usae(init=..., **train_changes)``: per-step losses, logged R² matrices,
        dead latents, training time."""
        from usae.train.history import TrainHistory

        folder = self._trained("usae", self.config.model_names, train_changes, init)
        return TrainHistory.from_dict(json.loads((folder / "history.json").read_text()))

    def independent_sae(self, name: str, *, seed: int | None = None, **train_changes: Any):
        """A single-model SAE of backbone ``name``: the same class (M = 1), width, k and recipe as the USAE.

        Its seed (None) defaults to the USAE's seed + 1: with the same seed it would start from exactly the
        USAE's initial atoms for that model, and comparing the two dictionaries (chapter 7) would be trivial.
        Its budget defaults to the USAE's steps / M (with its warmup scaled alike): the paper's rule updates one
        model per step, so that is as many updates as each model's encoder and decoder get inside the USAE."""
        from usae.core.model import UniversalSAE

        folder = self._trained("sae", (name,), self._sae_changes(name, seed, train_changes))
        return UniversalSAE.load(folder / "model.safetensors", map_location=self.device).eval()

    def _sae_changes(self, name: str, seed: int | None, train_changes: dict[str, Any]) -> dict[str, Any]:
        """The TrainConfig changes of ``independent_sae(name, seed=seed, **train_changes)``, defaults filled in."""
        if name not in self.config.model_names:
            raise ValueError(f"independent_sae: name = {name!r} is not valid; expected one of "
                             f"{list(self.config.model_names)}")
        changes = dict(train_changes)
        changes["seed"] = self.config.train.seed + 1 if seed is None else seed
        n_models = len(self.config.model_names)
        changes.setdefault("steps", max(1, self.config.train.steps // n_models))
        changes.setdefault("warmup_steps", self.config.train.warmup_steps // n_models)
        return changes

    # -- several trainings at once -------------------------------------------------------------------------
    def _training_folder(self, job: Training) -> tuple[str, tuple[str, ...], dict[str, Any], Path]:
        """(stage, models, TrainConfig changes, artifact folder) of ``job``; the folder may not exist yet."""
        changes = dict(job.changes)
        if job.model is None:
            stage, names = "usae", self.config.model_names
        else:
            stage, names = "sae", (job.model,)
            changes = self._sae_changes(job.model, changes.pop("seed", None), changes)
        _, key = self._train_key(names, changes, job.init if job.model is None else None)
        return stage, names, changes, self.runs / f"{stage}-{_stable_hash(key)}"

    def train_side_by_side(self, jobs: list[Training], workers: int | None = None) -> None:
        """Train every SAE of ``jobs`` that is not cached yet, side by side in worker processes with one torch
        thread each (one per job by default), so that ``usae(...)`` / ``independent_sae(...)`` then load them.

        An SAE step on 2 CPU cores runs only about 1.1-1.4x faster with two threads than with one, so two
        trainings side by side take little more than one. Each result depends on its seed and its thread
        count (one, as in the seeds table's runs). On a GPU, with one core, ``workers=1`` or a single job
        missing, the jobs train in turn in this process instead."""
        if not isinstance(jobs, (list, tuple)) or not all(isinstance(j, Training) for j in jobs):
            raise ValueError(f"train_side_by_side: jobs = {jobs!r} is not valid; expected a list of Training")
        folders = [self._training_folder(j) for j in jobs]          # bad names / inits fail here, first
        missing = [j for j, f in zip(jobs, folders, strict=True) if not f[3].is_dir()]
        if workers is not None:
            positive_int("train_side_by_side: workers", workers)
        if not missing:
            return
        if workers is None:
            workers = len(missing) if self.device.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1
        self.store()                                                 # extracted once, here, before any worker
        if workers == 1 or len(missing) == 1:
            for job in missing:
                job.train(self)
            return
        train_in_workers(self, missing, workers)


@dataclass
class Run:
    """A trained USAE artifact folder opened for analysis (:func:`load_run`): the ``model`` (eval mode), its
    ``history``, and the ``experiment`` that made it, whose ``store()`` holds the activations it was trained on
    (computed again, or found in the same cache, when needed)."""

    folder: Path
    experiment: Experiment
    model: Any
    history: Any

    def store(self):
        """The activation store of the run's experiment (its ``val`` split is what the analyses read)."""
        return self.experiment.store()


def load_run(folder: str | Path, *, progress: bool = True) -> Run:
    """Open the USAE folder that ``usae train`` printed (``<runs>/usae-<hash>``, or an independent SAE's):
    ``model.safetensors``, ``history.json`` and ``config.json``; the runs cache is the folder's parent.

    >>> run = load_run("data/runs/usae-1a2b3c4d5e")
    >>> r2_matrix(run.model, run.store())
    """
    from usae.core.model import UniversalSAE
    from usae.train.history import TrainHistory

    path = Path(folder).expanduser()
    missing = [n for n in ("model.safetensors", "history.json", "config.json") if not (path / n).is_file()]
    if missing:
        raise ValueError(f"run folder {str(path)!r} is not valid: it has no {', '.join(missing)}; expected the "
                         "folder that `usae train` printed (runs trained before config.json was written: train "
                         "again with the same command; it finds the cached model)")
    config = ExperimentConfig.from_dict(json.loads((path / "config.json").read_text()))
    exp = Experiment(config, runs=path.parent, progress=progress)
    model = UniversalSAE.load(path / "model.safetensors", map_location=exp.device).eval()
    history = TrainHistory.from_dict(json.loads((path / "history.json").read_text()))
    return Run(path, exp, model, history)
