import pytest
import torch

from usae.config import ToyWorldConfig
from usae.data.toyworld import (
    FACTORS,
    HELDOUT_COMBOS,
    LEVELS,
    OBJECT_PARTS,
    OBJECT_RGB,
    PART_SHADE,
    OOD_TEXTURE,
    SPLITS,
    TRAIN_TEXTURES,
    ToyBatch,
    ToyWorld,
    mixed_images,
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
    # three levels of abstraction cover every factor once; every object has two distinct parts
    assert list(LEVELS) == ["low", "mid", "high"]
    assert sorted(f for fs in LEVELS.values() for f in fs) == sorted(FACTORS)
    assert set(OBJECT_PARTS) == set(FACTORS["object"])
    assert sorted(p for ps in OBJECT_PARTS.values() for p in ps) == sorted(FACTORS["part"])


def test_shapes_dtypes_ranges(zoo400: ToyBatch):
    b, g = zoo400, 8
    assert b.images.shape == (400, 3, 64, 64) and b.images.dtype == torch.float32
    assert 0.0 <= b.images.min() and b.images.max() <= 1.0
    for k in (*FACTORS, "foreground"):
        assert b.patch_labels[k].shape == (400, g, g) and b.patch_labels[k].dtype == torch.int64
    for k in ("shape", "color", "object"):
        assert b.image_labels[f"{k}_present"].shape == (400, len(FACTORS[k]))
    for k in ("texture", "bg_color", "n_objects"):
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
                want_fg = int(sum(counts.values()) * 2 > p * p)
                assert b.patch_labels["foreground"][i, gy, gx] == want_fg
                want = {f: -1 for f in ("shape", "color", "object", "part")}
                if want_fg:  # the thing covering most pixels (lowest slot on a tie)
                    top = min(k for k, v in counts.items() if v == max(counts.values()))
                    at = inst.index(top)
                    for f in ("shape", "color", "object"):
                        want[f] = int(b.pixel_labels[f][window].flatten()[at])
                    if want["object"] >= 0:  # the part covering most of that thing's pixels (lowest id on a tie)
                        parts = [q for q, k in zip(b.pixel_labels["part"][window].flatten().tolist(), inst) if k == top]
                        want["part"] = min(q for q in set(parts) if parts.count(q) == max(map(parts.count, parts)))
                for f, v in want.items():
                    assert b.patch_labels[f][i, gy, gx] == v, (f, i, gy, gx)
                # a patch is a simple shape or a composed object, never both
                assert not (b.patch_labels["shape"][i, gy, gx] >= 0 and b.patch_labels["object"][i, gy, gx] >= 0)
                assert b.patch_labels["texture"][i, gy, gx] == b.image_labels["texture"][i]
                assert b.patch_labels["bg_color"][i, gy, gx] == b.image_labels["bg_color"][i]


def test_parts_belong_to_their_object(zoo400: ToyBatch):
    b = zoo400
    obj, part = b.pixel_labels["object"], b.pixel_labels["part"]
    assert torch.equal(obj >= 0, part >= 0)
    for o, name in enumerate(FACTORS["object"]):
        got = set(part[obj == o].unique().tolist())
        assert got == {FACTORS["part"].index(q) for q in OBJECT_PARTS[name]}, name
    pl = b.patch_labels
    for o, name in enumerate(FACTORS["object"]):
        assert set(pl["part"][pl["object"] == o].unique().tolist()) <= {FACTORS["part"].index(q) for q in OBJECT_PARTS[name]}


def test_image_labels_match_brute_force_visibility(zoo400: ToyBatch):
    b = zoo400
    for i in range(len(b)):
        inst = b.pixel_labels["instance"][i]
        present = {f: set() for f in ("shape", "color", "object")}
        for k in set(inst.unique().tolist()) - {-1}:
            at = tuple(torch.nonzero(inst == k)[0])
            if (inst == k).sum() >= 220:   # > 40 % of the largest possible secondary thing (a 26-px object)
                for f in present:
                    present[f].add(int(b.pixel_labels[f][i][at]))
        for f, want in present.items():
            got = set(torch.nonzero(b.image_labels[f"{f}_present"][i]).flatten().tolist())
            seen = set(b.pixel_labels[f][i].unique().tolist()) - {-1}
            assert want - {-1} <= got <= seen, (f, i)
        assert 1 <= int(b.image_labels["n_objects"][i]) <= 3
    assert b.image_labels["n_objects"].float().mean() > 1.8     # objects are rarely hidden


def test_pixel_labels_agree_with_pixel_colours(zoo400: ToyBatch):
    img = zoo400.images[:40].permute(0, 2, 3, 1).reshape(-1, 3)
    colour = zoo400.pixel_labels["color"][:40].reshape(-1)
    is_obj = colour >= 0
    bright = img.max(dim=1).values
    shaded = zoo400.pixel_labels["part"][:40].reshape(-1) % 2 == 1          # an object's second part
    # objects are saturated and bright, backgrounds dark: a threshold separates them exactly; an object's
    # second part is the same colour a shade darker (its direction in RGB, checked below, is unchanged)
    assert bright[is_obj & ~shaded].min() > 0.62 > bright[~is_obj].max()
    assert bright[is_obj & shaded].mean() < bright[is_obj & ~shaded].mean() * (PART_SHADE + 0.1)
    proto = torch.nn.functional.normalize(torch.from_numpy(OBJECT_RGB), dim=1)
    nearest = (torch.nn.functional.normalize(img[is_obj], dim=1) @ proto.T).argmax(1)
    assert torch.equal(nearest, colour[is_obj])


def test_every_factor_value_appears(world: ToyWorld, zoo400: ToyBatch):
    b = zoo400
    for factor in ("shape", "color", "object", "part"):
        assert set(b.patch_labels[factor].unique().tolist()) == set(range(len(FACTORS[factor]))) | {-1}, factor
    for factor in ("shape", "color", "object"):
        assert (b.image_labels[f"{factor}_present"].sum(0) > 20).all()
    assert set(b.image_labels["texture"].unique().tolist()) == {TEX.index(t) for t in TRAIN_TEXTURES}
    assert set(b.image_labels["bg_color"].unique().tolist()) == set(range(len(FACTORS["bg_color"])))
    assert set(b.patch_labels["foreground"].unique().tolist()) == {0, 1}
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
    assert (b.pixel_labels["instance"] >= 0).any(dim=(1, 2)).all()


def test_mixed_images_hold_a_shape_and_an_object(zoo400: ToyBatch):
    ids = mixed_images(zoo400).tolist()
    pl = zoo400.patch_labels
    want = [i for i in range(len(zoo400)) if (pl["shape"][i] >= 0).any() and (pl["object"][i] >= 0).any()]
    assert ids == want and len(ids) > 20
