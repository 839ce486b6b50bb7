"""Tests of usae.data.extract: grid resampling, image folders, standardisation, and extraction into a store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from usae.config import BackboneSpec, ExtractConfig
from usae.data.extract import extract_store, fit_standardisation, resample_grid
from usae.data.sources import ImageFolder, ImageSource, as_source
from usae.data.store import ActivationStore
from usae.data.zoo import load_backbone


# ----------------------------------------------------------------------------------------------- resampling
def test_resample_identity_when_grids_match():
    x = torch.randn(2, 14, 14, 5)
    assert resample_grid(x, 14) is x


def test_resample_keeps_constant_maps_constant():
    x = torch.full((3, 16, 16, 4), 2.5)
    torch.testing.assert_close(resample_grid(x, 14), torch.full((3, 14, 14, 4), 2.5))
    torch.testing.assert_close(resample_grid(x, 20), torch.full((3, 20, 20, 4), 2.5))


def test_resample_16_to_14_matches_antialiased_interpolate():
    x = torch.randn(2, 16, 16, 6)
    out = resample_grid(x, 14)
    ref = F.interpolate(x.permute(0, 3, 1, 2).contiguous(), size=(14, 14), mode="bilinear",
                        align_corners=False, antialias=True).permute(0, 2, 3, 1)
    assert out.shape == (2, 14, 14, 6)
    torch.testing.assert_close(out, ref)
    plain = F.interpolate(x.permute(0, 3, 1, 2), size=(14, 14), mode="bilinear", align_corners=False)
    assert not torch.allclose(out, plain.permute(0, 2, 3, 1))  # antialias is really on


def test_resample_bad_inputs():
    with pytest.raises(ValueError, match="grid"):
        resample_grid(torch.zeros(1, 4, 4, 2), 0)
    with pytest.raises(ValueError, match="B, h, w, D"):
        resample_grid(torch.zeros(4, 4, 2), 2)


# ------------------------------------------------------------------------------------------------ images
def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (6, 6), dtype=np.uint8)  # grayscale -> RGB
    _save(tmp_path / "z" / "b.png", b)
    _save(tmp_path / "a.png", a)
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    folder = ImageFolder(tmp_path)
    assert [p.name for p in folder.paths] == ["a.png", "b.png"] and len(folder) == 2
    x = folder.load([0, 1])
    assert x.shape == (2, 3, 6, 6) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(x[1], torch.from_numpy(b).float().expand(3, 6, 6) / 255)
    small = ImageFolder(tmp_path, image_size=4).load(range(2))
    assert small.shape == (2, 3, 4, 4) and 0 <= small.min() and small.max() <= 1
    shuffled = ImageFolder(tmp_path, shuffle=True, seed=1)
    assert sorted(shuffled.paths) == folder.paths
    assert shuffled.paths == ImageFolder(tmp_path, shuffle=True, seed=1).paths
    src = as_source(tmp_path, image_size=4)
    assert src.n_images == 2 and src.load(1, 1).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        folder.load([2])


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")
    _save(tmp_path / "mixed" / "a.png", np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / "mixed" / "b.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        ImageFolder(tmp_path / "mixed").load([0, 1])
    assert ImageFolder(tmp_path / "mixed", image_size=4).load([0, 1]).shape == (2, 3, 4, 4)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "fake.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="fake.jpg.*not a readable image"):
        ImageFolder(tmp_path / "bad").load([0])
    with pytest.raises(ValueError, match="image_size"):
        ImageFolder(tmp_path / "mixed", image_size=0)


def test_sources():
    images = torch.rand(5, 3, 4, 4)
    src = as_source(images)
    assert src.n_images == 5 and torch.equal(src.load(1, 2), images[1:3])
    with pytest.raises(ValueError):
        as_source(torch.rand(5, 4, 4))
    with pytest.raises(ValueError):
        as_source(42)
    with pytest.raises(ValueError):
        ImageSource(0, lambda s, c: None)


# ------------------------------------------------------------------------------------------ synthetic backbones
N_IMAGES = 24


def _images(n=N_IMAGES):
    """Image i is constant, with value (i + 1) / 64: backbones can read the image index from the pixels."""
    return ((torch.arange(n, dtype=torch.float32) + 1) / 64).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()


class PatchCoder(nn.Module):
    """A fake backbone: channel 0 = image index, 1 = row, 2 = column, then ``scale * noise``-like
    deterministic channels; native grid ``grid``."""

    def __init__(self, grid: int, dim: int = 5, scale: float = 1.0, offset: float = 0.0) -> None:
        super().__init__()
        self.grid, self.dim, self.scale, self.offset = grid, dim, scale, offset
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += images.shape[0]
        b, g = images.shape[0], self.grid
        idx = (images[:, 0, 0, 0] * 64).round() - 1
        rows = torch.arange(g, dtype=torch.float32).view(1, g, 1).expand(b, g, g)
        cols = torch.arange(g, dtype=torch.float32).view(1, 1, g).expand(b, g, g)
        ident = idx.view(b, 1, 1).expand(b, g, g)
        extra = [torch.sin(ident * (k + 1) + rows * 0.3 + cols * 0.7) * self.scale + self.offset
                 for k in range(self.dim - 3)]
        return torch.stack([ident, rows, cols, *extra], dim=-1)


def _cfg(**kw):
    base = dict(n_train_images=N_IMAGES, n_val_images=N_IMAGES, grid=4, dtype="float32", standardise="none",
                n_stats_images=8, batch_size=5, image_size=8)
    base.update(kw)
    return ExtractConfig(**base)


def test_rows_are_aligned_across_models(tmp_path):
    backbones = {"native": PatchCoder(4), "fine": PatchCoder(8, dim=7)}
    store = extract_store(backbones, {"train": _images(), "val": _images(6)}, _cfg(), tmp_path / "s",
                          meta={"k": 1}, progress=False)
    assert store.dims == {"native": 5, "fine": 7} and store.grid == 4 and store.tokens_per_image == 16
    assert store.n_rows("train") == N_IMAGES * 16 and store.n_rows("val") == 6 * 16
    for split, n in (("train", N_IMAGES), ("val", 6)):
        r = torch.arange(n * 16)
        native, fine = store.rows(split, "native", 0, n * 16), store.rows(split, "fine", 0, n * 16)
        torch.testing.assert_close(native[:, 0], (r // 16).float())      # image index
        torch.testing.assert_close(native[:, 1], (r % 16 // 4).float())  # row-major token order
        torch.testing.assert_close(native[:, 2], (r % 4).float())
        torch.testing.assert_close(fine[:, 0], (r // 16).float())        # resampled 8x8 -> 4x4, same patches
    for batch in store.batches("train", 32, seed=0):
        torch.testing.assert_close(batch["native"][:, 0], batch["fine"][:, 0])
    assert ActivationStore.open(tmp_path / "s", expect_meta={"k": 1}).meta == {"k": 1}


def test_split_sizes_follow_the_config(tmp_path):
    store = extract_store({"m": PatchCoder(4)}, {"train": _images(), "val": _images(), "ood": _images(7)},
                          _cfg(n_train_images=10, n_val_images=30), tmp_path / "s", progress=False)
    assert (store.n_images("train"), store.n_images("val"), store.n_images("ood")) == (10, N_IMAGES, 7)


@pytest.mark.parametrize("mode", ["scalar", "channel"])
def test_standardisation_statistics_match_brute_force(mode):
    coder = PatchCoder(4, scale=3.0, offset=1.5)
    stats = fit_standardisation(coder, _images(), 10, mode=mode, batch_size=3)
    tokens = coder(_images()[:10]).double()
    if mode == "scalar":
        mean, std = tokens.mean(), tokens.std(unbiased=False)
    else:
        flat = tokens.reshape(-1, 5)
        mean, std = flat.mean(0), flat.std(0, unbiased=False)
    assert stats.mode == mode
    torch.testing.assert_close(stats.mean, mean.float())
    torch.testing.assert_close(stats.std, std.float())
    assert fit_standardisation(coder, _images(), 3, mode="none").mode == "none"
    with pytest.raises(ValueError, match="n_images"):
        fit_standardisation(coder, _images(), N_IMAGES + 1)
    with pytest.raises(ValueError, match="mode"):
        fit_standardisation(coder, _images(), 3, mode="robust")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_extraction_standardises_with_train_statistics(tmp_path, dtype):
    backbones = {"a": PatchCoder(4, scale=3.0, offset=1.5), "b": PatchCoder(8, dim=6, scale=0.5)}
    cfg = _cfg(standardise="scalar", n_stats_images=7, dtype=dtype)  # 7: not a multiple of the batch size
    store = extract_store(backbones, {"train": _images(), "val": _images(9)}, cfg, tmp_path / "s",
                          progress=False)
    # every image went through each backbone once (the statistics reuse the extraction pass)
    assert backbones["a"].calls == backbones["b"].calls == N_IMAGES + 9
    for name, bb in backbones.items():
        ref_stats = fit_standardisation(PatchCoder(bb.grid, bb.dim, bb.scale, bb.offset), _images(), 7)
        torch.testing.assert_close(store.stats[name].mean, ref_stats.mean)
        torch.testing.assert_close(store.stats[name].std, ref_stats.std)
        for split, n in (("train", N_IMAGES), ("val", 9)):
            ref = ref_stats.apply(resample_grid(bb(_images(n)), 4)).reshape(-1, bb.dim)
            tol = dict(rtol=2e-3, atol=2e-3) if dtype == "float16" else {}
            torch.testing.assert_close(store.rows(split, name, 0, n * 16), ref, **tol)
    # held-out extraction with given statistics
    other = extract_store({"a": PatchCoder(4, scale=3.0, offset=1.5)}, {"ood": _images(4)}, cfg,
                          tmp_path / "ood", stats={"a": store.stats["a"]}, progress=False)
    torch.testing.assert_close(other.stats["a"].mean, store.stats["a"].mean)


def test_labels_are_stored_per_token(tmp_path):
    def load(start, count):
        images = _images()[start:start + count]
        pos = torch.arange(16).view(1, 4, 4).expand(count, 4, 4)
        return images, {"image": torch.arange(start, start + count).view(-1, 1, 1).expand(count, 4, 4),
                        "pos": pos}

    sources = {"train": ImageSource(N_IMAGES, load), "val": _images(3)}
    val_labels = {"val": lambda s, c: {"flat": np.ones((c, 16), dtype=np.int64)}}
    store = extract_store({"m": PatchCoder(4)}, sources, _cfg(), tmp_path / "s", labels=val_labels,
                          progress=False)
    lab = store.labels("train")
    r = np.arange(N_IMAGES * 16)
    np.testing.assert_array_equal(lab["image"], r // 16)
    np.testing.assert_array_equal(lab["pos"], r % 16)
    np.testing.assert_array_equal(store.labels("val")["flat"], np.ones(48))
    bad = {"train": ImageSource(4, lambda s, c: (_images()[s:s + c], {"x": np.zeros((c, 3, 3))}))}
    with pytest.raises(ValueError, match="labels 'x'"):
        extract_store({"m": PatchCoder(4)}, bad, _cfg(), tmp_path / "bad", progress=False)


class Broken(PatchCoder):
    def __init__(self, value: float) -> None:
        super().__init__(4)
        self.value = value

    def forward(self, images):
        out = super().forward(images)
        out[0, 0, 0, 3] = self.value
        return out


@pytest.mark.parametrize("value,dtype,match", [(float("nan"), "float32", "NaN or Inf"),
                                                (float("inf"), "float16", "NaN or Inf"),
                                                (1e6, "float16", "float32")])
def test_non_finite_activations_are_an_error(tmp_path, value, dtype, match):
    with pytest.raises(ValueError, match=match):
        extract_store({"ok": PatchCoder(4), "bad": Broken(value)}, {"train": _images()}, _cfg(dtype=dtype),
                      tmp_path / "s", progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


def test_extract_bad_inputs(tmp_path):
    cfg = _cfg()
    with pytest.raises(ValueError, match="backbones is empty"):
        extract_store({}, {"train": _images()}, cfg, tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="splits is empty"):
        extract_store({"m": PatchCoder(4)}, {}, cfg, tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="dim"):
        extract_store({"m": nn.Identity()}, {"train": _images()}, cfg, tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="no 'train' split"):
        extract_store({"m": PatchCoder(4)}, {"val": _images()}, _cfg(standardise="scalar"), tmp_path / "s",
                      progress=False)
    with pytest.raises(ValueError, match="not among splits"):
        extract_store({"m": PatchCoder(4)}, {"train": _images()}, cfg, tmp_path / "s",
                      labels={"val": lambda s, c: {}}, progress=False)
    with pytest.raises(ValueError, match="stats has no"):
        extract_store({"m": PatchCoder(4)}, {"train": _images()}, cfg, tmp_path / "s", stats={},
                      progress=False)
    with pytest.raises(ValueError, match="JSON"):
        extract_store({"m": PatchCoder(4)}, {"train": _images()}, cfg, tmp_path / "s", meta={"x": object()},
                      progress=False)
    with pytest.raises(ValueError, match="returned"):
        extract_store({"m": PatchCoder(4)}, {"train": ImageSource(5, lambda s, c: torch.zeros(1, 3, 8, 8))},
                      cfg, tmp_path / "s", progress=False)
    extract_store({"m": PatchCoder(4)}, {"train": _images()}, cfg, tmp_path / "s", progress=False)
    with pytest.raises(FileExistsError):
        extract_store({"m": PatchCoder(4)}, {"train": _images()}, cfg, tmp_path / "s", progress=False)
    again = extract_store({"m": PatchCoder(4)}, {"train": _images(2)}, cfg, tmp_path / "s", overwrite=True,
                          progress=False)
    assert again.n_images("train") == 2


# ----------------------------------------------------------------------------------------------- end to end
def test_end_to_end_with_toy_backbones(tmp_path):
    torch.manual_seed(0)
    backbones = {n: load_backbone(BackboneSpec(n, pretrained=False)) for n in ("toy_vit", "toy_mixer")}
    images = torch.rand(10, 3, 64, 64)
    cfg = ExtractConfig(n_train_images=8, n_val_images=2, grid=8, n_stats_images=4, batch_size=3)
    store = extract_store(backbones, {"train": images[:8], "val": images[8:]}, cfg, tmp_path / "s",
                          meta={"preset": "test"}, progress=False)
    assert store.dims == {n: b.dim for n, b in backbones.items()} == {"toy_vit": 128, "toy_mixer": 112}
    assert store.n_rows("train") == 8 * 64
    with torch.no_grad():
        for name, bb in backbones.items():
            stats = fit_standardisation(bb, images, 4)
            torch.testing.assert_close(store.stats[name].mean, stats.mean)
            ref = stats.apply(bb(images[8:])).reshape(-1, bb.dim)
            torch.testing.assert_close(store.rows("val", name, 0, 128), ref, rtol=2e-3, atol=2e-3)
    batch = next(store.batches("train", 100, seed=0))
    assert batch["toy_vit"].shape == (100, 128) and batch["toy_mixer"].shape == (100, 112)
