"""A dry run of the ``paper`` preset, end to end on CPU, through the same code the chapters call.

The paper's three architectures (DINOv2 ViT-S/14, SigLIP ViT-B/16, supervised ViT-B/16; random weights, as no
weights can be downloaded here) read a tiny ImageNet-like folder (``train/<class>/*.JPEG``, ``val/<class>/*``)
through ``Experiment(preset("paper"), images=...)``: extraction to the common 14x14 grid, per-model scalar
standardisation, the paper's USAE (m = 8 x 768 = 6144, k = 32, BatchNorm encoder), one training step with the
paper's ``TrainConfig`` (L1 + official aux, per-model AdamW) and one statistics pass (R² matrix, firing
statistics, a gallery). Only sizes change: image counts, the token batch (2 images instead of 32) and the
number of steps. The run is shared by the tests of this module (the whole module: 40-60 s on two busy cores).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usae import Experiment, TrainConfig, UniversalSAE, cam, load_official, preset, r2_matrix, self_reconstruction
from usae.cam import study as cam_study
from usae.config import PAPER_BACKBONES, BackboneSpec, ExperimentConfig
from usae.core.official import OFFICIAL_STANDARDISATION
from usae.data.extract import extract_store, resample_grid
from usae.data.sources import ImageFolder
from usae.data.standardisation import Standardisation
from usae.data.store import ActivationStore
from usae.data.zoo import get_entry
from usae.stats import firing, galleries

N_IMAGES = 2                  # per split
TOKENS = 14 * 14              # the common grid
M_PAPER = 8 * 768             # 6144
PINNED = {"dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
          "siglip_vitb16": "vit_base_patch16_siglip_224.webli",
          "vit_b16": "vit_base_patch16_224.augreg2_in21k_ft_in1k"}


def _image_folder(root: Path) -> Path:
    """ImageNet's layout in miniature: two classes per split, one JPEG each, not 224 px and not square."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(N_IMAGES):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            pixels = rng.integers(0, 256, (180 + 20 * c, 260, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{split}_{c}.JPEG", quality=90)
    return root


def paper_dry_run_config() -> ExperimentConfig:
    """``preset("paper")`` with random-weight backbones and only the sizes a CPU test cannot afford changed."""
    paper = preset("paper")
    return preset("paper",
                  backbones=tuple(BackboneSpec(n, pretrained=False) for n in PAPER_BACKBONES),
                  extract=paper.extract.replace(n_train_images=N_IMAGES, n_val_images=N_IMAGES, batch_size=N_IMAGES),
                  train=paper.train.replace(steps=1, batch_size=N_IMAGES * TOKENS))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    images = _image_folder(root / "imagenet")
    torch.manual_seed(0)  # the random backbone weights
    exp = Experiment(paper_dry_run_config(), runs=root / "runs", progress=False, images=images)
    store = exp.store()
    model = exp.usae()
    return {"exp": exp, "store": store, "model": model, "history": exp.usae_history(), "images": images}


def test_only_sizes_differ_from_the_paper_preset():
    paper, dry = preset("paper"), paper_dry_run_config()
    assert dry.usae == paper.usae and dry.device == paper.device == "auto"
    assert dry.train.replace(steps=paper.train.steps, batch_size=paper.train.batch_size) == paper.train
    assert dry.extract.replace(n_train_images=paper.extract.n_train_images, n_val_images=paper.extract.n_val_images,
                               batch_size=paper.extract.batch_size) == paper.extract
    assert [b.replace(pretrained=True) for b in dry.backbones] == list(paper.backbones)
    # what the paper (and its official code) uses
    assert paper.model_names == PAPER_BACKBONES and paper.extract.grid == 14 and paper.extract.image_size == 224
    assert paper.extract.standardise == "scalar" and paper.extract.n_stats_images == 1000
    assert (paper.usae.expansion, paper.usae.k, paper.usae.encoder) == (8, 32, "batchnorm")
    t = paper.train
    assert (t.loss, t.aux, t.aux_coef, t.update, t.lr, t.final_lr, t.weight_decay, t.grad_clip) == \
        ("l1", "official", 0.1, "paper", 3e-4, 1e-6, 1e-5, 1.0)
    assert t.batch_size == 32 * TOKENS == 6272
    # the official total_iters = len(ImageNet-train) / 32 x 30 epochs; warmup: one epoch of 40,036 steps
    assert t.steps == 1_281_167 * 30 // 32 == 1_201_094 and t.warmup_steps == 1_281_167 // 32 == 40_036


def test_backbones_are_the_pinned_paper_architectures(run):
    backbones = run["exp"].backbones()
    assert list(backbones) == list(PAPER_BACKBONES)
    for name, bb in backbones.items():
        assert get_entry(name).timm_id == PINNED[name]
        assert bb.entry.image_size == 224
    assert {n: (b.dim, b.grid) for n, b in backbones.items()} == \
        {"dinov2_vits14": (384, 16), "siglip_vitb16": (768, 14), "vit_b16": (768, 14)}
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # device="auto"
    assert run["exp"].device.type == expected
    assert {next(b.parameters()).device.type for b in backbones.values()} == {expected}


def test_store_rows_are_the_aligned_standardised_tokens(run):
    exp, store = run["exp"], run["store"]
    assert store.grid == 14 and store.dims == {"dinov2_vits14": 384, "siglip_vitb16": 768, "vit_b16": 768}
    assert set(store.splits) == {"train", "val"}
    for split in ("train", "val"):
        assert store.n_images(split) == N_IMAGES and store.n_rows(split) == N_IMAGES * TOKENS
    # the same code path by hand: backbone (DINOv2: 16x16 grid of 14-px patches) -> 14x14 -> standardise
    image = exp.images("val", [1])
    assert tuple(image.shape) == (1, 3, 224, 224) and 0 <= float(image.min()) and float(image.max()) <= 1
    with torch.no_grad():
        for name, bb in exp.backbones().items():
            native = bb(image.to(exp.device)).cpu()
            assert native.shape[1:3] == ((16, 16) if name == "dinov2_vits14" else (14, 14))
            expected = store.stats[name].apply(resample_grid(native, 14)).reshape(TOKENS, -1)
            rows = store.rows("val", name, TOKENS, 2 * TOKENS)
            assert torch.allclose(rows, expected, atol=2e-2, rtol=2e-3), name  # float16 store
            stats = store.stats[name]
            assert stats.mean.numel() == 1 and stats.std.numel() == 1  # scalar standardisation


def test_paper_usae_trains_one_step(run):
    model, history, store = run["model"], run["history"], run["store"]
    assert (model.n_latents, model.k, model.encoder_kind) == (M_PAPER, 32, "batchnorm")
    assert model.dims == store.dims and model.names == PAPER_BACKBONES
    assert len(history.loss) == 1 and math.isfinite(history.loss[0])
    assert history.lr == [1e-6]  # step 0 of the warmup starts at final_lr
    assert history.model[0] in range(3)  # one model picked for the step
    for name in PAPER_BACKBONES:  # the official aux term is on for every target
        assert history.aux[name][0] > 0
    # the trainer's checkpoint folder (checkpoint_every=10,000: one checkpoint at the end) is removed once the
    # artifact is complete
    assert not list(run["exp"].runs.glob(".usae-*.checkpoints"))
    # standardisation travels with the model
    for name in PAPER_BACKBONES:
        mean, std = model.standardisation(name)
        assert torch.allclose(mean.cpu(), store.stats[name].mean) and torch.allclose(std.cpu(), store.stats[name].std)


def test_statistics_pass(run):
    model, store, exp = run["model"], run["store"], run["exp"]
    r2 = r2_matrix(model, store, split="val")
    assert tuple(r2.shape) == (3, 3) and torch.isfinite(r2).all()
    stats = firing.firing_stats(model, store, split="val", progress=False)
    assert stats.n_tokens == N_IMAGES * TOKENS and tuple(stats.fires.shape) == (3, M_PAPER)
    assert (stats.fires.sum(1) <= stats.n_tokens * model.k).all() and stats.fires.sum() > 0
    assert (stats.cofires <= stats.fires.min(0).values).all()
    # a gallery of the most energetic concept: images come from the folder, heatmaps on the 14x14 grid
    k = int(torch.argmax(stats.activation_sum.sum(0)))
    gallery = galleries.galleries(model, store, exp.images, [k], "val", n_images=N_IMAGES)[k]
    assert tuple(gallery.images.shape) == (N_IMAGES, 3, 224, 224)
    assert all(tuple(h.shape) == (N_IMAGES, 14, 14) for h in gallery.heatmaps.values())
    assert gallery.peak > 0


def _official_files(model, folder: Path) -> dict[str, Path]:
    """Our trained model written in the released files' layout (``uni_<Model>_checkpoint_29.pth``), nested
    under ``"model"`` next to optimizer state as the official training saves it."""
    files = {}
    for our, theirs in OFFICIAL_NAMES.items():
        coder = model.coder(our)
        state = {"encoder.final_block.0.weight": coder.linear.weight, "encoder.final_block.0.bias": coder.linear.bias,
                 "dictionary._weights": coder.dictionary}
        for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            state[f"encoder.final_block.1.{part}"] = getattr(coder.bn, part)
        state = {k: v.detach().cpu().clone() for k, v in state.items()}
        files[our] = folder / theirs / f"uni_{theirs}_checkpoint_29.pth"
        files[our].parent.mkdir(parents=True)
        torch.save({"epoch": 29, "model": state, "optimizer": {"state": {}, "param_groups": []}}, files[our])
    return files


OFFICIAL_NAMES = {"siglip_vitb16": "SigLIP", "dinov2_vits14": "DinoV2", "vit_b16": "ViT"}  # the official order


def test_released_checkpoint_recipe(run, tmp_path):
    """The appendix's recipe for the authors' checkpoints, verbatim but for sizes (CAM at the smoke setting)."""
    exp = run["exp"]
    files = _official_files(run["model"], tmp_path / "weights")
    released = {ours: OFFICIAL_STANDARDISATION[theirs] for ours, theirs in OFFICIAL_NAMES.items()}
    sae = load_official(files, k=32, standardisation=released).to(exp.device)
    assert sae.names == tuple(OFFICIAL_NAMES) and sae.n_latents == M_PAPER
    path = exp.runs / "official-val"
    stats = {n: Standardisation(torch.tensor(mean), torch.tensor(std)) for n, (mean, std) in released.items()}
    val = ActivationStore.open(path) if path.exists() else extract_store(
        exp.backbones(), {"val": exp.image_sources()["val"]}, exp.config.extract, path, stats=stats, progress=False)
    assert val.stats["siglip_vitb16"].mean == torch.tensor(-0.030537)
    fs = firing.firing_stats(sae, val, split="val", progress=False)
    for k in (5718, 923):  # Fig. 12: SigLIP-unique "star" and letter "C" in the released model
        assert 0 <= float(fs.fires[:, k].sum())
    gals = galleries.galleries(sae, val, exp.images, [5718, 923], split="val", n_images=N_IMAGES)
    assert all(tuple(g.images.shape) == (N_IMAGES, 3, 224, 224) for g in gals.values())
    # the same rows as the store's, re-standardised: only the statistics differ
    ours = run["store"].stats["vit_b16"]
    raw = ours.invert(run["store"].rows("val", "vit_b16", 0, TOKENS))
    assert torch.allclose(val.rows("val", "vit_b16", 0, TOKENS), stats["vit_b16"].apply(raw), atol=2e-2, rtol=2e-3)
    settings = cam.cam_settings("smoke", steps=1, size=32, n_views=1)  # the appendix: cam_settings("paper")
    study = cam_study.study_concept(exp.backbones(), sae, val, 5718, settings, exp.images, label="star (Fig. 12)",
                                    n_exemplars=N_IMAGES, show=1, with_consensus=False, progress=False)
    assert set(study.cams) == set(OFFICIAL_NAMES) and len(study.rows) == 3


def test_ood_folder_recipe(run, tmp_path):
    """The appendix's recipe for an out-of-distribution folder (DTD, CelebA): an extra split standardised with
    the training store's statistics, then the same statistics and galleries."""
    exp, model, store = run["exp"], run["model"], run["store"]
    folder_path = run["images"] / "val"  # stands in for /data/dtd/images
    path = tmp_path / "ood-dtd"
    dtd = ActivationStore.open(path) if path.exists() else extract_store(
        exp.backbones(), {"dtd": str(folder_path)}, exp.config.extract, path, stats=store.stats, progress=False)
    assert dtd.n_images("dtd") == N_IMAGES and dtd.stats["vit_b16"].mean == store.stats["vit_b16"].mean
    table = self_reconstruction(model, dtd, split="dtd")
    assert set(table) == set(PAPER_BACKBONES) and all(math.isfinite(v["r2"]) for v in table.values())
    fs = firing.firing_stats(model, dtd, split="dtd", progress=False)
    assert fs.n_tokens == N_IMAGES * TOKENS
    folder = ImageFolder(folder_path, image_size=224)
    gals = galleries.galleries(model, dtd, lambda split, ids: folder.load([int(i) for i in ids]), [273],
                               split="dtd", n_images=N_IMAGES)
    # the split's rows are the val split's (same folder, same sorted order): same images, same heatmaps
    assert torch.equal(gals[273].images, exp.images("val", gals[273].image_ids))


def test_a_data_parallel_run_is_adopted_by_the_experiment(run, tmp_path):
    """``usae.train.distributed`` (one process here; torchrun on GPUs) over the experiment's store, then
    ``Experiment.adopt_usae``: the chapters' ``exp.usae()`` returns that model instead of training one."""
    from usae.train import distributed

    exp, store, out = run["exp"], run["store"], tmp_path / "usae-dp"
    argv = ["--preset", "paper", "--store", str(store.path), "--out", str(out), "--steps", "1", "--batch-size",
            str(N_IMAGES * TOKENS), "--seed", "1", "--device", "cpu", "--no-progress"]
    assert distributed.main(argv) == 0
    with pytest.raises(ValueError, match="already has a trained USAE"):
        exp.adopt_usae(out)  # the dry run's own artifact (seed 0) exists
    with pytest.raises(ValueError, match="records 1 steps"):
        exp.adopt_usae(out, seed=1, steps=2)
    folder = exp.adopt_usae(out, seed=1)
    assert (folder / "adopted_from.txt").is_file()
    adopted, trained = exp.usae(seed=1), UniversalSAE.load(out / "model.safetensors")
    assert adopted.names == PAPER_BACKBONES
    pairs = zip(adopted.state_dict().values(), trained.state_dict().values(), strict=True)
    assert all(torch.equal(a.cpu(), b) for a, b in pairs)


# -- the paper path's clear errors (fast: nothing is built) -------------------------------------------------
def test_images_must_be_a_folder_and_a_real_backbone_config(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        Experiment("paper", runs=tmp_path / "runs", images=tmp_path / "missing")
    with pytest.raises(ValueError, match="toy world"):
        Experiment("smoke", runs=tmp_path / "runs", images=tmp_path)
    with pytest.raises(ValueError, match="toy models"):
        Experiment(preset("smoke").replace(source=str(tmp_path)), runs=tmp_path / "runs")
    exp = Experiment("paper", runs=tmp_path / "runs", images=tmp_path)
    assert exp.config.source == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="Experiment.images"):
        _ = exp.world


def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA device"):
        _ = Experiment(preset("paper", device="cuda"), runs=tmp_path / "runs", images=tmp_path).device
    assert Experiment(preset("paper"), runs=tmp_path / "runs", images=tmp_path).device.type == "cpu"


def test_paper_train_config_is_valid_for_the_paper_model():
    cfg = preset("paper")
    assert isinstance(cfg.train, TrainConfig) and cfg.usae.width({"a": 384, "b": 768}) == M_PAPER
