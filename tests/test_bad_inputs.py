"""Bad input, one case per test: the exact error a user sees, and proof that nothing was written or overwritten.

Every case asserts the message (it names the bad value and what would be valid or how to fix it) and compares
the target folder before and after: absent stays absent, an existing store/checkpoint/file keeps every byte.
The last test scans the sources: nothing is ever unpickled from disk except official checkpoints read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import ast
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usae import cli
from usae.config import ExtractConfig, TrainConfig, USAEConfig, ZooTrainConfig, preset
from usae.core.model import UniversalSAE
from usae.data.extract import extract_store
from usae.data.sources import ImageFolder
from usae.data.store import ActivationStore, StoreError
from usae.experiment import Experiment
from usae.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` (hidden ones too) with its bytes; None when the folder does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Toy(torch.nn.Module):
    """A fixed random 'backbone': images [B, 3, 16, 16] -> tokens [B, 4, 4, dim]; ``nan_from``: NaN tokens
    for images from that index of a batch on."""

    def __init__(self, dim: int, seed: int, nan_from: int | None = None) -> None:
        super().__init__()
        self.dim, self.nan_from = dim, nan_from
        self.proj = torch.nn.Linear(48, dim)
        gen = torch.Generator().manual_seed(seed)
        torch.nn.init.normal_(self.proj.weight, generator=gen)
        torch.nn.init.normal_(self.proj.bias, generator=gen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(len(images), 4, 4, 48)
        out = self.proj(patches)
        if self.nan_from is not None:
            out[self.nan_from:] = float("nan")
        return out


CFG = ExtractConfig(n_train_images=12, n_val_images=4, grid=4, image_size=16, n_stats_images=8, batch_size=4)
IMAGES = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def backbones(**nan):
    return {"a": Toy(8, 1, nan.get("a")), "b": Toy(12, 2)}


def make_store(path: Path, meta: dict | None = None) -> ActivationStore:
    return extract_store(backbones(), {"train": IMAGES[:12], "val": IMAGES[12:]}, CFG, path, meta=meta,
                         progress=False)


def write_png(path: Path, size: int, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def small_sae(n_latents: int = 32) -> UniversalSAE:
    torch.manual_seed(0)
    return UniversalSAE({"a": 8, "b": 12}, n_latents, 4)


def rows(n: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"a": torch.randn(n, 8, generator=gen), "b": torch.randn(n, 12, generator=gen)}


TRAIN = TrainConfig(steps=4, batch_size=16, lr=1e-2, warmup_steps=1, log_every=2, checkpoint_every=2)


# ------------------------------------------------------------------------------------------------ configuration
def test_unknown_preset(tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(ValueError, match=r"preset = 'huge' is not valid; expected one of \['smoke', 'book', 'paper'\]"):
        Experiment("huge", runs=runs)
    assert cli.main(["train", "--preset", "huge", "--runs", str(runs)]) == 1
    assert "error: preset = 'huge' is not valid; expected one of ['smoke', 'book', 'paper']" in capsys.readouterr().err
    assert not runs.exists()


def test_unknown_backbone_name(tmp_path):
    runs = tmp_path / "runs"
    expected = r"unknown backbone 'resnet9000': neither a usae.data.zoo shortcut \[.*'dinov2_vits14'.*\] nor a timm"
    with pytest.raises(ValueError, match=expected):
        Experiment(preset("paper").replace(backbones=("dinov2_vits14", "resnet9000")), runs=runs)
    toy = preset("smoke").replace(backbones=(), zoo=ZooTrainConfig(models=("toy_vit", "toy_resnet9000")))
    with pytest.raises(ValueError, match=r"unknown backbone 'toy_resnet9000': neither a usae.data.zoo shortcut"):
        Experiment(toy, runs=runs)  # fails before training the zoo, not after
    assert not runs.exists()


def test_k_larger_than_m(tmp_path):
    with pytest.raises(ValueError, match=r"USAEConfig.k = 128 is not valid; expected k <= n_latents=64"):
        USAEConfig(n_latents=64, k=128)
    with pytest.raises(ValueError, match=r"k = 128 is not valid; expected an integer with 1 <= k <= n_latents=64"):
        UniversalSAE({"a": 8}, 64, 128)
    runs = tmp_path / "runs"
    wide_k = preset("smoke").replace(usae=USAEConfig(n_latents=None, expansion=1, k=512))  # m = 1 x 128
    with pytest.raises(ValueError, match=r"USAEConfig.k = 512 is not valid; expected k <= n_latents=128"):
        Experiment(wide_k, runs=runs)  # known before the zoo is trained and the store extracted
    assert not runs.exists()


def test_device_cuda_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    runs = tmp_path / "runs"
    msg = "ExperimentConfig.device = 'cuda' is not valid on this machine: torch sees no CUDA device; use device='auto'"
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        Experiment(preset("smoke", device="cuda"), runs=runs)
    assert cli.main(["extract", "--preset", "smoke", "--set", "device=cuda", "--runs", str(runs)]) == 1
    assert msg in capsys.readouterr().err
    assert not runs.exists()


def test_unknown_setting_on_the_command_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli.main(["train", "--preset", "smoke", "--set", "train.stepz=10", "--runs", str(runs)]) == 1
    err = capsys.readouterr().err
    assert "--set 'train.stepz=10': 'stepz' is not a field of train; valid fields are [" in err and "'steps'" in err
    assert cli.main(["train", "--preset", "smoke", "--set", "train.lr=-1", "--runs", str(runs)]) == 1
    assert "TrainConfig.lr = -1 is not valid; expected a number > 0" in capsys.readouterr().err
    assert not runs.exists()


# ------------------------------------------------------------------------------------------------ images
def test_empty_image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "README.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"image folder '.*images' has no images \(found 1 other files\); expected "
                                         r"files ending in \['.jpg', '.jpeg', '.png'"):
        extract_store(backbones(), {"train": folder}, CFG, tmp_path / "store", progress=False)
    runs = tmp_path / "runs"
    exp = Experiment("paper", runs=runs, images=folder, progress=False)
    with pytest.raises(ValueError, match=r"has no images \(found 1 other files\)"):
        exp.store()  # found before any backbone is built or any artifact folder is made
    assert entries(tmp_path) == ["images", "runs"] and entries(runs) == []


def test_corrupt_image_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        write_png(folder / f"{i}.png", 16, i)
    (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ValueError, match=r"'.*3\.png' is not a readable image \(UnidentifiedImageError: "):
        extract_store(backbones(), {"train": folder}, CFG, tmp_path / "store", progress=False)
    assert entries(tmp_path) == ["images"]  # no store, no temp folder


def test_mixed_image_sizes_without_resize(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_png(folder / "0.png", 16)
    write_png(folder / "1.png", 20)
    with pytest.raises(ValueError, match=r"images have different sizes: '.*0\.png' is 16x16 but '.*1\.png' is 20x20; "
                                         r"pass image_size= to resize them"):
        extract_store(backbones(), {"train": ImageFolder(folder)}, CFG, tmp_path / "store", progress=False)
    assert entries(tmp_path) == ["images"]


# ------------------------------------------------------------------------------------------------ stores
def test_store_from_another_config(tmp_path):
    store = make_store(tmp_path / "store", meta={"key": "aaa"})
    before = snapshot(store.path)
    with pytest.raises(StoreError, match=r"the store at '.*store' was written by another configuration "
                                         r"\(key: store has 'aaa', expected 'bbb'\); re-extract it"):
        ActivationStore.open(store.path, expect_meta={"key": "bbb"})
    sae = UniversalSAE({"a": 16, "b": 12}, 32, 4)  # a model for another backbone width than the store's
    with pytest.raises(ValueError, match=r"input for 'a' has shape .*; expected \[N, 16\]"):
        Trainer(sae, TRAIN, checkpoint_dir=tmp_path / "ckpt", progress=False).fit(store)
    other = UniversalSAE({"a": 8, "c": 12}, 32, 4)  # a model of another set of backbones
    with pytest.raises(ValueError, match=r"unknown model 'c'; this store has \['a', 'b'\]"):
        Trainer(other, TRAIN, checkpoint_dir=tmp_path / "ckpt", progress=False).fit(store)
    assert snapshot(store.path) == before and not (tmp_path / "ckpt").exists()


def test_truncated_shard(tmp_path):
    store = make_store(tmp_path / "store")
    shard = store.path / "train" / "a" / "00000.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    before = snapshot(store.path)
    with pytest.raises(StoreError, match=r"store file '.*00000\.npy' has \d+ bytes but should have \d+ \(truncated "
                                         r"or corrupted\); re-extract the store"):
        ActivationStore.open(store.path)
    assert snapshot(store.path) == before


def test_store_of_an_interrupted_extraction(tmp_path):
    store = make_store(tmp_path / "store")
    (store.path / "manifest.json").unlink()
    before = snapshot(store.path)
    with pytest.raises(StoreError, match=r"has no manifest.json, so it is not a complete activation store \(an "
                                         r"interrupted extraction leaves none\); re-extract it"):
        ActivationStore.open(store.path)
    assert snapshot(store.path) == before


def test_nan_activations(tmp_path):
    old = make_store(tmp_path / "store")
    before = snapshot(old.path)
    with pytest.raises(ValueError, match=r"activations of backbone 'a' on split 'train', images 0\.\.7 are NaN or Inf; "
                                         r"check the backbone's weights and the input images"):
        extract_store(backbones(a=2), {"train": IMAGES[:12], "val": IMAGES[12:]}, CFG, old.path, overwrite=True,
                      progress=False)
    assert snapshot(old.path) == before and entries(tmp_path) == ["store"]  # old store intact, no temp folder
    data = rows()
    data["a"][5, 3] = float("nan")
    with pytest.raises(ValueError, match=r"the training rows of 'a' contain NaN/Inf \(first at row 5\); fix or drop "
                                         r"those rows before training"):
        Trainer(small_sae(), TRAIN, checkpoint_dir=tmp_path / "ckpt", progress=False).fit(data)
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_of_another_width(tmp_path):
    ckpt = tmp_path / "ckpt"
    Trainer(small_sae(64), TRAIN, checkpoint_dir=ckpt, progress=False).fit(rows())
    before = snapshot(ckpt)
    narrow = small_sae(32)
    weights = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(ValueError, match=r"was written with another config \(model_config.n_latents: checkpoint 64 "
                                         r"vs now 32\); use another checkpoint_dir or remove it"):
        Trainer(narrow, TRAIN, checkpoint_dir=ckpt, progress=False).fit(rows())
    path = small_sae(64).save(tmp_path / "wide.safetensors")
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match=r"it has n_latents = 64, the model has n_latents = 32; build the model with "
                                         r"n_latents=64 or use UniversalSAE.load\(path\)"):
        narrow.load_tensors(load_file(str(path)))
    assert snapshot(ckpt) == before
    assert all(torch.equal(v, weights[k]) for k, v in narrow.state_dict().items())  # the model is untouched


def official_file(folder: Path, drop: str | None = None) -> Path:
    m, d = 64, 8
    state = {"encoder.final_block.0.weight": torch.randn(m, d), "encoder.final_block.0.bias": torch.randn(m),
             "encoder.final_block.1.weight": torch.ones(m), "encoder.final_block.1.bias": torch.zeros(m),
             "encoder.final_block.1.running_mean": torch.zeros(m), "encoder.final_block.1.running_var": torch.ones(m),
             "encoder.final_block.1.num_batches_tracked": torch.tensor(3), "dictionary._weights": torch.randn(m, d)}
    state.pop(drop, None)
    folder.mkdir(exist_ok=True)
    path = folder / "uni_ViT_checkpoint_1.pth"
    torch.save({"model": state, "epoch": 1}, path)
    return path


def test_official_checkpoint_with_missing_keys(tmp_path):
    from usae.core.official import load_official

    folder = tmp_path / "official"
    official_file(folder, drop="encoder.final_block.0.bias")
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"uni_ViT_checkpoint_1\.pth: not a complete official USAE checkpoint: "
                                         r"missing \['encoder\.final_block\.0\.bias'\]; found \["):
        load_official(folder)
    official_file(folder, drop="encoder.final_block.1.running_var")
    with pytest.raises(ValueError, match=r"not a complete official USAE checkpoint: missing "
                                         r"'encoder\.final_block\.1\.running_var' of its BatchNorm encoder"):
        load_official(folder)
    official_file(folder, drop="encoder.final_block.0.bias")
    assert snapshot(folder).keys() == before.keys()


def test_official_checkpoint_with_code_inside_is_not_unpickled(tmp_path):
    from usae.core.official import load_official

    folder = tmp_path / "official"
    folder.mkdir()
    torch.save({"model": {"dictionary._weights": torch.zeros(2, 2)}, "hook": Exploit()},
               folder / "uni_ViT_checkpoint_1.pth")
    Exploit.ran = False
    with pytest.raises(ValueError, match=r"uni_ViT_checkpoint_1\.pth: cannot read it as a weights-only torch "
                                         r"checkpoint \(.*Weights only load failed"):
        load_official(folder)
    assert not Exploit.ran


class Exploit:
    """An object whose unpickling would run code (here: set a flag)."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran() -> None:
    Exploit.ran = True


# ------------------------------------------------------------------------------------------------ disk full
def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_a_model(tmp_path, monkeypatch):
    import usae.core.model

    path = small_sae().save(tmp_path / "model.safetensors")
    before = snapshot(tmp_path)

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
        enospc()

    monkeypatch.setattr(usae.core.model, "save_file", half_then_full)
    with pytest.raises(OSError, match=r"no space left on the device while writing '.*model\.safetensors' \(No space "
                                      r"left on device\); free some space or write elsewhere"):
        small_sae(64).save(path)
    assert snapshot(tmp_path) == before  # the previous model intact, no temp file left
    assert UniversalSAE.load(path).n_latents == 32


def test_disk_full_while_extracting_over_an_existing_store(tmp_path, monkeypatch):
    old = make_store(tmp_path / "store")
    before = snapshot(old.path)
    monkeypatch.setattr(os, "posix_fallocate", enospc)  # shard files are allocated in full when created
    with pytest.raises(OSError, match=r"no space left on the device while writing '.*00000\.npy' \(No space left on "
                                      r"device\); free some space or write elsewhere \(e\.g\. set USAE_RUNS\)"):
        extract_store(backbones(), {"train": IMAGES[:12], "val": IMAGES[12:]}, CFG, old.path, overwrite=True,
                      progress=False)
    assert snapshot(old.path) == before and entries(tmp_path) == ["store"]


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch):
    import usae.train.checkpoint

    ckpt = tmp_path / "ckpt"
    trainer = Trainer(small_sae(), TRAIN, checkpoint_dir=ckpt, progress=False)
    real_save, before = usae.train.checkpoint.save_file, {}

    def full_after_first(tensors, filename, *args, **kwargs):  # step 2 is written, step 4 finds the disk full
        if before:
            before["step 2"] = snapshot(ckpt / "step_000000002")
            enospc()
        real_save(tensors, filename, *args, **kwargs)
        before["written"] = True

    monkeypatch.setattr(usae.train.checkpoint, "save_file", full_after_first)
    with pytest.raises(OSError, match=r"no space left on the device while writing '.*step_000000004' \(No space "
                                      r"left on device\); free some space"):
        trainer.fit(rows())
    assert entries(ckpt) == ["step_000000002"]  # the previous checkpoint, and no temp folder
    assert snapshot(ckpt / "step_000000002") == before["step 2"]


# ------------------------------------------------------------------------------------------------ analysis APIs
def stats_and_model():
    from usae.stats.firing import firing_stats

    sae = small_sae().eval()
    return firing_stats(sae, rows(), progress=False), sae


def test_concept_index_out_of_range():
    from usae.cam.objectives import concept_head
    from usae.stats.galleries import top_images
    from usae.viz.concepts import concept_title

    stats, sae = stats_and_model()
    with pytest.raises(ValueError, match=r"concepts hold ids in \[40, 40\]; expected ids in \[0, 32\)"):
        top_images(sae, rows(), [40], grid=4)
    with pytest.raises(ValueError, match=r"concept index k = 40 is not valid; expected an integer in \[0, 32\) \(the "
                                         r"USAE has m = 32 concepts\)"):
        concept_head(sae, "a", 40)
    for bad in (40, -1):  # -1 used to wrap around silently to the last concept
        with pytest.raises(ValueError, match=rf"concept = {bad} is not valid; expected a concept index in \[0, 32\)"):
            concept_title(stats, bad)
    assert concept_title(stats, torch.tensor(3)).startswith("concept 3")  # a 0-d tensor index is fine


def test_negative_firing_threshold():
    from usae.stats.firing import firing_stats

    sae = small_sae().eval()
    with pytest.raises(ValueError, match=r"threshold = -0\.1 is not valid; expected a number >= 0 \(a concept fires on "
                                         r"a token when its code value exceeds it; the paper's tau is 0\.1\)"):
        firing_stats(sae, rows(), threshold=-0.1, progress=False)
    with pytest.raises(ValueError, match=r"threshold = '0\.1' is not valid; expected a number >= 0"):
        firing_stats(sae, rows(), threshold="0.1", progress=False)


# ------------------------------------------------------------------------------------------------ papermill
def test_papermill_chapter_with_an_invalid_preset(tmp_path, monkeypatch):
    import papermill as pm

    runs = tmp_path / "runs"
    monkeypatch.setenv("USAE_RUNS", str(runs))
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(str(ROOT / "book" / "01_toy_world.ipynb"), str(tmp_path / "out.ipynb"),
                            cwd=str(ROOT / "book"), parameters={"preset": "huge"}, progress_bar=False,
                            kernel_name="python3")
    assert info.value.ename == "ValueError"
    assert info.value.evalue == "preset = 'huge' is not valid; expected one of ['smoke', 'book', 'paper']"
    assert not runs.exists()  # the chapter stops at its first cell after the parameters, before any work


# ------------------------------------------------------------------------------------------------ no pickles
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _sources() -> dict[str, str]:
    found = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "usae").rglob("*.py"))}
    for nb in sorted((ROOT / "book").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        found[str(nb.relative_to(ROOT))] = "\n".join(line for cell in code for line in cell.splitlines()
                                                     if not line.lstrip().startswith(("%", "!")))
    return found


def test_nothing_is_unpickled_from_disk_except_weights_only_official_checkpoints():
    unpicklers = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
    torch_loads = []
    for name, text in _sources().items():
        tree = ast.parse(text, filename=name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & unpicklers, f"{name}: imports an unpickler"
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in unpicklers, f"{name}: imports from an unpickler"
        for call, func in _calls(tree):
            keywords = {k.arg: k.value for k in call.keywords}
            where = f"{name}:{call.lineno}: {func}"
            if func.endswith(("torch.load", "jit.load", "read_pickle", "load_state_dict_from_url", "PackageImporter")):
                torch_loads.append(where)
                weights_only = keywords.get("weights_only")
                assert func == "torch.load" and isinstance(weights_only, ast.Constant) and weights_only.value is True, \
                    f"{where} may unpickle arbitrary objects; read safetensors or torch.load(weights_only=True)"
            if func.split(".")[-1] in ("load", "read_array") and func.split(".")[0] in ("np", "numpy"):
                allow = keywords.get("allow_pickle")
                assert allow is None or (isinstance(allow, ast.Constant) and allow.value is False), \
                    f"{where} allows pickles"
    assert len(torch_loads) == 1 and torch_loads[0].startswith("usae/core/official.py:"), torch_loads
