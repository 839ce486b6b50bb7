import pytest
import torch

from usae.config import ToyWorldConfig
from usae.data.toyworld import (
    FACTORS,
    HELDOUT_COMBOS,
    OBJECT_RGB,
    OOD_TEXTURE,
    SPLITS,
    TRAIN_TEXTURES,
    ToyBatch,
    ToyWorld,
)

TEX = FACTORS["texture"]
COL = FACTORS["color"]


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(ToyWorldConfig())


@pytest.fixture(scope="module")
def zoo400(world: ToyWorld) -> ToyBatch:
    return world.batch("zoo", 0, 400, pixels=True)


def test_factor_inventory():
    assert len(FACTORS["shape"]) >= 5 and len(COL) >= 6 and len(TRAIN_TEXTURES) >= 3
    assert OOD_TEXTURE in TEX and OOD_TEXTURE not in TRAIN_TEXTURES
    assert set(SPLITS) == {"zoo", "train", "val", "ood_combos", "ood_textures"}
    # every training texture keeps most colours; every colour is held out somewhere
    assert {c for c, _ in HELDOUT_COMBOS} == set(COL)
    for t in TRAIN_TEXTURES:
        assert sum((c, t) not in HELDOUT_COMBOS for c in COL) >= len(COL) // 2


def test_shapes_dtypes_ranges(zoo400: ToyBatch):
    b, g = zoo400, 8
    assert b.images.shape == (400, 3, 64, 64) and b.images.dtype == torch.float32
    assert 0.0 <= b.images.min() and b.images.max() <= 1.0
    for k in ("shape", "color", "texture", "bg_color", "object"):
        assert b.patch_labels[k].shape == (400, g, g) and b.patch_labels[k].dtype == torch.int64
    assert b.image_labels["shape_present"].shape == (400, len(FACTORS["shape"]))
    assert b.image_labels["color_present"].shape == (400, len(COL))
    for k in ("texture", "bg_color", "largest_shape", "largest_color", "n_objects"):
        assert b.image_labels[k].shape == (400,) and b.image_labels[k].dtype == torch.int64
    assert b.pixel_labels["shape"].shape == (400, 64, 64)


def test_same_index_same_image_regardless_of_batching(world: ToyWorld):
    whole = world.batch("train", 240, 300)          # crosses an internal chunk boundary
    parts = [world.batch("train", 240 + lo, n) for lo, n in ((0, 1), (1, 16), (17, 283))]
    again = ToyWorld(ToyWorldConfig()).batch("train", 250, 5)
    assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
    for k in whole.patch_labels:
        assert torch.equal(torch.cat([p.patch_labels[k] for p in parts]), whole.patch_labels[k])
    for k in whole.image_labels:
        assert torch.equal(torch.cat([p.image_labels[k] for p in parts]), whole.image_labels[k])
    assert torch.equal(again.images, whole.images[10:15])


def test_seed_and_split_change_the_images(world: ToyWorld):
    a = world.batch("train", 0, 8).images
    assert not torch.equal(a, ToyWorld(ToyWorldConfig(seed=1)).batch("train", 0, 8).images)
    assert not torch.equal(a, world.batch("val", 0, 8).images)


def test_patch_labels_match_brute_force_majority(zoo400: ToyBatch):
    b, p = zoo400, 8
    for i in range(16):
        for gy in range(8):
            for gx in range(8):
                window = (i, slice(gy * p, (gy + 1) * p), slice(gx * p, (gx + 1) * p))
                inst = b.pixel_labels["instance"][window].flatten().tolist()
                counts = {k: inst.count(k) for k in set(inst) if k >= 0}
                want_object = int(sum(counts.values()) * 2 > p * p)
                assert b.patch_labels["object"][i, gy, gx] == want_object
                if want_object:  # the object covering most pixels (lowest slot on a tie)
                    top = min(k for k, v in counts.items() if v == max(counts.values()))
                    at = inst.index(top)
                    want_shape = b.pixel_labels["shape"][window].flatten()[at]
                    want_colour = b.pixel_labels["color"][window].flatten()[at]
                else:
                    want_shape = want_colour = -1
                assert b.patch_labels["shape"][i, gy, gx] == want_shape
                assert b.patch_labels["color"][i, gy, gx] == want_colour
                assert b.patch_labels["texture"][i, gy, gx] == b.image_labels["texture"][i]
                assert b.patch_labels["bg_color"][i, gy, gx] == b.image_labels["bg_color"][i]


def test_image_labels_match_brute_force_visibility(zoo400: ToyBatch):
    b = zoo400
    for i in range(len(b)):
        inst = b.pixel_labels["instance"][i]
        present_s, present_c = set(), set()
        for k in set(inst.unique().tolist()) - {-1}:
            at = torch.nonzero(inst == k)[0]
            shape, colour = int(b.pixel_labels["shape"][i][tuple(at)]), int(b.pixel_labels["color"][i][tuple(at)])
            if k == 0:  # the primary (largest) object is drawn last, so it is never occluded
                assert (shape, colour) == (int(b.image_labels["largest_shape"][i]),
                                           int(b.image_labels["largest_color"][i]))
            if (inst == k).sum() >= 120:   # > 40 % of the largest possible secondary object (a 19-px circle)
                present_s.add(shape)
                present_c.add(colour)
        got_s = set(torch.nonzero(b.image_labels["shape_present"][i]).flatten().tolist())
        got_c = set(torch.nonzero(b.image_labels["color_present"][i]).flatten().tolist())
        seen_s = set(b.pixel_labels["shape"][i].unique().tolist()) - {-1}
        seen_c = set(b.pixel_labels["color"][i].unique().tolist()) - {-1}
        assert present_s <= got_s <= seen_s and present_c <= got_c <= seen_c
        assert 1 <= int(b.image_labels["n_objects"][i]) <= 3
    assert b.image_labels["n_objects"].float().mean() > 1.8     # objects are rarely hidden


def test_pixel_labels_agree_with_pixel_colours(zoo400: ToyBatch):
    img = zoo400.images[:40].permute(0, 2, 3, 1).reshape(-1, 3)
    colour = zoo400.pixel_labels["color"][:40].reshape(-1)
    is_obj = colour >= 0
    bright = img.max(dim=1).values
    # objects are saturated and bright, backgrounds dark: a threshold separates them exactly
    assert bright[is_obj].min() > 0.62 > bright[~is_obj].max()
    proto = torch.nn.functional.normalize(torch.from_numpy(OBJECT_RGB), dim=1)
    nearest = (torch.nn.functional.normalize(img[is_obj], dim=1) @ proto.T).argmax(1)
    assert torch.equal(nearest, colour[is_obj])


def test_every_factor_value_appears(world: ToyWorld, zoo400: ToyBatch):
    b = zoo400
    for factor in ("shape", "color"):
        assert set(b.patch_labels[factor].unique().tolist()) == set(range(len(FACTORS[factor]))) | {-1}
        assert (b.image_labels[f"{factor}_present"].sum(0) > 20).all()
        assert set(b.image_labels[f"largest_{factor}"].unique().tolist()) == set(range(len(FACTORS[factor])))
    assert set(b.image_labels["texture"].unique().tolist()) == {TEX.index(t) for t in TRAIN_TEXTURES}
    assert set(b.image_labels["bg_color"].unique().tolist()) == set(range(len(FACTORS["bg_color"])))
    assert set(b.patch_labels["object"].unique().tolist()) == {0, 1}
    ood = world.batch("ood_textures", 0, 64)
    assert set(ood.image_labels["texture"].unique().tolist()) == {TEX.index(OOD_TEXTURE)}


@pytest.mark.parametrize("split", ["zoo", "train", "val", "ood_combos", "ood_textures"])
def test_splits_contain_only_their_combinations(world: ToyWorld, split: str):
    b = world.batch(split, 0, 200, pixels=True)
    textures = {TEX[t] for t in b.image_labels["texture"].tolist()}
    if split == "ood_textures":
        assert textures == {OOD_TEXTURE}
    else:
        assert textures == set(TRAIN_TEXTURES)
    for i in range(len(b)):
        tex = TEX[int(b.image_labels["texture"][i])]
        colours = {COL[c] for c in b.pixel_labels["color"][i].unique().tolist() if c >= 0}
        held = {(c, tex) in HELDOUT_COMBOS for c in colours}
        if split == "ood_combos":
            assert held == {True}, (i, tex, colours)
        elif split != "ood_textures":
            assert held == {False}, (i, tex, colours)


def test_bad_input_raises(world: ToyWorld):
    with pytest.raises(ValueError, match="split"):
        world.batch("test", 0, 4)
    with pytest.raises(ValueError, match="start"):
        world.batch("zoo", -1, 4)
    with pytest.raises(ValueError, match="count"):
        world.batch("zoo", 0, 0)
    with pytest.raises(ValueError, match="ToyWorldConfig"):
        ToyWorld({"image_size": 64})


def test_other_sizes_and_object_counts():
    w = ToyWorld(ToyWorldConfig(image_size=32, grid=4, min_objects=2, max_objects=4, seed=3))
    b = w.batch("val", 5, 40, pixels=True)
    assert b.images.shape == (40, 3, 32, 32) and b.patch_labels["shape"].shape == (40, 4, 4)
    assert b.image_labels["n_objects"].max() <= 4
    assert (b.pixel_labels["shape"] >= 0).any(dim=(1, 2)).all()
