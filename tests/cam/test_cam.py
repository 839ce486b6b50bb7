"""usae.cam: parameterisations, transforms, objectives and the render loop on tiny random models."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from usae import cam
from usae.cam.objectives import REDUCTIONS
from usae.cam.spectrum import Spectrum, compute_spectrum, hermitian_columns
from usae.cam.study import concept_rank, image_scores, top_exemplars
from usae.core.model import UniversalSAE
from usae.data.zoo import Backbone, ZooEntry

SIZE = 32


class TinyCNN(nn.Module):
    """A CNN whose forward_features returns a [B, D, h, w] map (like timm's ConvNeXt)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 4, stride=4)
        self.conv2 = nn.Conv2d(8, dim, 2, stride=2)

    def forward_features(self, x):
        return self.conv2(F.gelu(self.conv1(x)))


def tiny_backbones():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=0)
    vit_entry = ZooEntry("vit", "VisionTransformer", None, (), "vit", 1, SIZE, (0.5,) * 3, (0.5,) * 3, 24, 4, True)
    cnn_entry = ZooEntry("cnn", "TinyCNN", None, (), "cnn", 0, SIZE, (0.4, 0.45, 0.5), (0.2, 0.25, 0.3), 16, 4, True)
    return {"vit": Backbone(vit_entry, vit), "cnn": Backbone(cnn_entry, TinyCNN())}


def tiny_sae(vector_stats: bool = False) -> UniversalSAE:
    torch.manual_seed(1)
    sae = UniversalSAE({"vit": 24, "cnn": 16}, n_latents=32, k=4)
    for coder in sae.coders:  # non-trivial BatchNorm statistics and affine parameters
        coder.bn.running_mean.normal_()
        coder.bn.running_var.uniform_(0.5, 2.0)
        coder.bn.weight.data.uniform_(0.5, 1.5)
        coder.bn.bias.data.normal_()
    sae.set_standardisation("vit", torch.randn(24) * 0.1 if vector_stats else 0.1,
                            torch.rand(24) + 0.5 if vector_stats else 2.0)
    sae.set_standardisation("cnn", -0.2, 0.7)
    return sae.eval()


@pytest.fixture(scope="module")
def models():
    return tiny_backbones(), tiny_sae()


def small_spectrum(size: int = SIZE) -> Spectrum:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(16, 3, size, size, generator=g)
    images = F.avg_pool2d(images, 3, 1, 1)  # some spatial correlation
    return compute_spectrum(lambda s, c: images[s:s + c], 16, batch_size=8, progress=False)


# ------------------------------------------------------------------------------------------------ objectives
@pytest.mark.parametrize("vector_stats", [False, True])
def test_concept_head_matches_encode_pre(vector_stats):
    sae = tiny_sae(vector_stats)
    x = torch.randn(7, 24) * 3 + 1
    ks = [0, 5, 31]
    expected = sae.encode_pre("vit", sae.standardise("vit", x))[:, ks]
    weight, bias = cam.concept_head(sae, "vit", ks)
    torch.testing.assert_close(x @ weight + bias, expected, atol=1e-4, rtol=1e-4)
    sae.train()  # the head always uses BatchNorm's running statistics (eval mode)
    w5, b5 = cam.concept_head(sae, "vit", 5)
    torch.testing.assert_close(x @ w5 + b5, expected[:, 1], atol=1e-4, rtol=1e-4)
    ws, bs = cam.concept_head(sae, "vit", ks, standardised=True)
    xs = sae.standardise("vit", x)
    torch.testing.assert_close(xs @ ws + bs, expected, atol=1e-4, rtol=1e-4)


def test_concept_activation_is_token_aware_on_vit_tokens_and_cnn_maps(models):
    _, sae = models
    tokens = torch.randn(3, 5, 24)                           # ViT-shaped [B, T, D]
    acts = cam.concept_activation(sae, "vit", 7, tokens)
    brute = torch.stack([torch.stack([sae.encode_pre("vit", sae.standardise("vit", tokens[b, t:t + 1]))[0, 7]
                                      for t in range(5)]) for b in range(3)])
    assert acts.shape == (3, 5)
    torch.testing.assert_close(acts, brute, atol=1e-4, rtol=1e-4)
    cnn_map = torch.randn(2, 16, 3, 4)                        # CNN map [B, D, h, w]
    acts = cam.concept_activation(sae, "cnn", 2, cnn_map)
    brute = sae.encode_pre("cnn", sae.standardise("cnn", cnn_map.permute(0, 2, 3, 1).reshape(-1, 16)))[:, 2]
    assert acts.shape == (2, 3, 4)
    torch.testing.assert_close(acts.reshape(-1), brute, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cam.concept_activation(sae, "cnn", 2, cnn_map.permute(0, 2, 3, 1)), acts)
    with pytest.raises(ValueError, match="width 16"):
        cam.concept_activation(sae, "cnn", 2, torch.randn(2, 5, 3, 4))


class FakeContext:
    """A CamContext stand-in with fixed tokens: ``tokens[name]`` is [B * n, h, w, D]."""

    def __init__(self, sae, tokens, batch, images=None):
        self.sae, self.raw, self.batch = sae, tokens, batch
        self.images = images if images is not None else torch.rand(batch, 3, 8, 8)

    def concept_map(self, name, k):
        return cam.concept_activation(self.sae, name, k, self.raw[name])


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_concept_objective_reduces_tokens_then_views(models, reduce):
    _, sae = models
    tokens = {"vit": torch.randn(6, 2, 3, 24), "cnn": torch.randn(6, 2, 2, 16)}   # batch 2 x 3 views
    ctx = FakeContext(sae, tokens, batch=2)
    value = cam.concept("vit", 4, reduce)(ctx)
    per_token = sae.encode_pre("vit", sae.standardise("vit", tokens["vit"].reshape(-1, 24)))[:, 4].view(6, 6)
    per_view = per_token.mean(1) if reduce == "mean" else per_token.max(1).values
    torch.testing.assert_close(value, per_view.view(2, 3).mean(1), atol=1e-4, rtol=1e-4)


def test_objectives_compose_with_plus_and_scalar_times(models):
    _, sae = models
    ctx = FakeContext(sae, {"vit": torch.randn(4, 2, 2, 24), "cnn": torch.randn(4, 2, 2, 16)}, batch=2)
    a, b = cam.concept("vit", 1), cam.concept("cnn", 3, "max")
    tv = cam.total_variation()
    combined = 2 * a + b / 4 - 0.5 * tv
    expected = 2 * a(ctx) + 0.25 * b(ctx) - 0.5 * tv(ctx)
    torch.testing.assert_close(combined(ctx), expected)
    assert combined.models == {"vit", "cnn"}
    assert combined.concepts == (("vit", 1), ("cnn", 3))
    assert "concept 1 of vit" in combined.description and "0.5 × total variation" in combined.description
    total = sum([a, b])
    torch.testing.assert_close(total(ctx), a(ctx) + b(ctx))
    torch.testing.assert_close((-a)(ctx), -a(ctx))
    x = ctx.images
    tv_brute = (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
    torch.testing.assert_close(tv(ctx), tv_brute)
    torch.testing.assert_close(cam.l2()(ctx), (x - 0.5).square().mean((1, 2, 3)))


# ------------------------------------------------------------------------------------------------ spectrum
def test_spectrum_matches_a_numpy_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(10, 3, 12, 12, generator=g)
    spec = compute_spectrum(lambda s, c: images[s:s + c], 10, batch_size=4, progress=False)
    first = images[:4].permute(1, 0, 2, 3).reshape(3, -1).double().numpy()  # colours: the first batch
    evals, evecs = np.linalg.eigh(np.cov(first))
    sqrt = evecs @ np.diag(np.sqrt(evals)) @ evecs.T
    sqrt /= np.linalg.norm(sqrt, axis=0).max()
    np.testing.assert_allclose(spec.colour_sqrt.numpy(), sqrt, atol=1e-5)
    x = images.double().numpy()
    z = np.einsum("ij,njhw->nihw", np.linalg.inv(sqrt), x - x.mean((2, 3), keepdims=True))
    mag = np.abs(np.fft.rfft2(z, norm="ortho")).mean(0)                       # all 10 images
    np.testing.assert_allclose(spec.magnitude.numpy(), mag, rtol=1e-4, atol=1e-5)


def test_spectrum_save_load_and_resize(tmp_path):
    spec = small_spectrum()
    path = spec.save(tmp_path / "s.npz")
    back = Spectrum.load(path)
    torch.testing.assert_close(back.magnitude, spec.magnitude)
    torch.testing.assert_close(back.colour_sqrt, spec.colour_sqrt)
    assert back.meta["n_images"] == 16
    torch.testing.assert_close(spec.magnitude_at(SIZE), spec.magnitude, atol=1e-5, rtol=1e-5)  # already Hermitian
    for size in (20, 47, 64):
        mag = spec.magnitude_at(size)
        assert mag.shape == (3, size, size // 2 + 1) and (mag >= 0).all()
        torch.testing.assert_close(hermitian_columns(mag, size, odd=False), mag)
    with pytest.raises(ValueError, match="does not exist"):
        Spectrum.load(tmp_path / "missing.npz")


def test_committed_toy_spectrum_is_small_and_valid():
    from usae.cam.spectrum import default_spectrum_path

    path = default_spectrum_path()
    assert path.is_file() and path.stat().st_size < 200_000
    spec = cam.load_spectrum(path)
    assert spec.magnitude.shape == (3, 64, 33) and torch.isfinite(spec.magnitude).all()
    assert spec.magnitude[:, 0, 0].abs().max() < 1e-3 * spec.magnitude.max()  # mean-free: no DC


# ------------------------------------------------------------------------------------------------ parameterisations
@pytest.mark.parametrize("size", [16, 15])
def test_maco_image_has_exactly_the_fixed_magnitude(size):
    spec = small_spectrum()
    param = cam.MacoImage(size, batch=2, generator=torch.Generator().manual_seed(0), spectrum=spec)
    torch.testing.assert_close(param.magnitude, spec.magnitude_at(size))
    opt = torch.optim.NAdam(param.parameters(), lr=1.0)
    for _ in range(3):  # still exact after the phase has been optimised
        loss = -(param()[:, 0] * torch.linspace(0, 1, size)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    spatial = param.spatial()
    assert spatial.shape == (2, 3, size, size)
    measured = torch.fft.rfft2(spatial.double(), norm="ortho").abs()
    torch.testing.assert_close(measured.float(), param.magnitude.expand_as(measured), atol=1e-5, rtol=1e-4)
    out = param()
    assert out.shape == (2, 3, size, size) and out.min() >= 0 and out.max() <= 1


def test_fourier_image_scales_frequencies_by_one_over_f():
    param = cam.FourierImage(16, generator=torch.Generator().manual_seed(0), colour_sqrt=torch.eye(3))
    radius = cam.params.frequency_radius(16)
    ratio = param.scale * radius.clamp_min(1 / 16)
    torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio))   # scale ∝ 1 / |f|
    assert param().shape == (1, 3, 16, 16)


def test_value_range_maps_into_pixels_and_model_units():
    vr = cam.params.check_value_range((-2.5, 2.5))
    p = cam.PixelImage(8, value_range=vr)
    p.logits.data.fill_(50.0)
    torch.testing.assert_close(p(), torch.full((1, 3, 8, 8), 2.5))
    bbs = tiny_backbones()
    settings = cam.cam_settings("smoke", value_range=(-2.5, 2.5), value_space="model")
    torch.testing.assert_close(cam.pixel_range(settings, [bbs["vit"]]),
                               torch.tensor([[-0.75] * 3, [1.75] * 3]))     # SigLIP-style mean = std = 0.5
    both = cam.pixel_range(settings, [bbs["vit"], bbs["cnn"]])              # intersection: the cnn's range
    torch.testing.assert_close(both, torch.tensor([[-0.1, -0.175, -0.25], [0.9, 1.075, 1.25]]))
    with pytest.raises(ValueError, match="value_range"):
        cam.params.check_value_range((1.0, 0.0))


# ------------------------------------------------------------------------------------------------ transforms
def test_identity_views_and_exact_centre_crop():
    img = torch.rand(1, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    same = cam.Views(2, (cam.Crops((1.0, 1.0), 0.0),), ())(img, 16, gen)
    torch.testing.assert_close(same, img.expand(2, -1, -1, -1), atol=1e-5, rtol=1e-5)
    half = cam.Views(1, (cam.Crops((0.5, 0.5), 0.0),), ())(img, 8, gen)
    torch.testing.assert_close(half, img[..., 4:12, 4:12], atol=1e-5, rtol=1e-5)
    batch = torch.rand(2, 3, 16, 16)
    views = cam.Views(3, (cam.Crops((1.0, 1.0), 0.0),), ())(batch, 16, gen)
    torch.testing.assert_close(views[3:], batch[1:].expand(3, -1, -1, -1), atol=1e-5, rtol=1e-5)


def test_crops_stay_inside_the_image_and_noise_has_its_scale():
    gen = torch.Generator().manual_seed(0)
    m = cam.Crops((0.2, 0.3), 0.4).matrices(500, 64, gen)
    side, centre = m[:, 0, 0], m[:, :2, 2]
    assert ((side >= 0.2) & (side <= 0.3)).all()
    assert ((centre - side[:, None]).min() >= -1 - 1e-6) and ((centre + side[:, None]).max() <= 1 + 1e-6)
    views = cam.Noise(0.05, 0.05)(torch.zeros(4, 3, 32, 32), gen)
    assert abs(float(views.std()) - math.sqrt(0.05 ** 2 + 0.05 ** 2 / 12)) < 2e-3


# ------------------------------------------------------------------------------------------------ render
TRANSFORMS = {
    "maco crops + noise": dict(crop_size=(0.5, 0.8)),
    "jitter, scale, rotate": dict(crop_size=None, jitter=2.0, scale=(0.9, 1.1), rotate=10.0),
    "none": dict(crop_size=None, noise_std=0.0, noise_uniform=0.0),
}


@pytest.mark.parametrize("param", ["pixel", "fourier", "maco"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_every_parameterisation_and_transform_runs_and_changes_the_image(models, param, transform):
    bbs, sae = models
    settings = cam.CamSettings(param=param, size=SIZE, steps=3, n_views=2, **TRANSFORMS[transform])
    before = cam.make_param(param, SIZE, seed=0, spectrum=small_spectrum())().detach()
    result = cam.render(cam.concept("vit", 3) - 0.1 * cam.total_variation(), bbs, sae, settings,
                        spectrum=small_spectrum(), progress=False)
    assert result.images.shape == (1, 3, SIZE, SIZE) and result.alpha.shape == (1, SIZE, SIZE)
    assert (result.images - before).abs().max() > 1e-4
    assert torch.isfinite(result.history).all() and result.history.shape == (3, 1)
    assert (result.alpha >= 0).all() and result.alpha.sum() > 0


def test_render_ascends_the_objective_and_is_seeded(models):
    bbs, sae = models
    settings = cam.CamSettings(param="fourier", size=SIZE, steps=30, lr=0.3, n_views=2, crop_size=(0.8, 1.0))
    obj = cam.concept("cnn", 5)
    a = cam.render(obj, bbs, sae, settings, seed=4, spectrum=small_spectrum(), progress=False)
    b = cam.render(obj, bbs, sae, settings, seed=4, spectrum=small_spectrum(), progress=False)
    c = cam.render(obj, bbs, sae, settings, seed=5, spectrum=small_spectrum(), progress=False)
    torch.testing.assert_close(a.images, b.images)
    assert (a.images - c.images).abs().max() > 1e-3
    assert a.history[-5:].mean() > a.history[:5].mean() + 0.1
    pre, _ = image_scores(bbs["cnn"], sae, "cnn", a.images)
    init = cam.make_param("fourier", SIZE, seed=4, spectrum=small_spectrum())().detach()
    assert pre[0, 5] > image_scores(bbs["cnn"], sae, "cnn", init)[0][0, 5]


def test_coordinated_gives_one_image_per_model_and_consensus_reads_all(models):
    bbs, sae = models
    settings = cam.CamSettings(size=SIZE, steps=2, n_views=1)
    per_model = cam.coordinated(bbs, sae, 6, settings, spectrum=small_spectrum(), progress=False)
    assert list(per_model) == ["vit", "cnn"]
    assert per_model["vit"].description.startswith("concept 6 of vit")
    joint = cam.consensus(bbs, sae, 6, settings, spectrum=small_spectrum(), progress=False)
    assert "vit" in joint.description and "cnn" in joint.description
    assert settings.objective(["vit", "cnn"], 6).models == {"vit", "cnn"}


def test_bad_input_gives_clear_errors(models):
    bbs, sae = models
    settings = cam.CamSettings(size=SIZE, steps=1, n_views=1)
    with pytest.raises(ValueError, match=r"k = 32 is not valid.*m = 32"):
        cam.render(cam.concept("vit", 32), bbs, sae, settings, progress=False)
    with pytest.raises(ValueError, match="k = -1"):
        cam.concept("vit", -1)
    with pytest.raises(ValueError, match="'dino'.*not among the backbones"):
        cam.render(cam.concept("dino", 0), bbs, sae, settings, progress=False)
    with pytest.raises(ValueError, match="'dino' is not valid"):
        cam.concept_head(sae, "dino", 0)
    with pytest.raises(ValueError, match="size = 4 is not valid"):
        cam.CamSettings(size=4)
    with pytest.raises(ValueError, match="size = 0 is not valid"):
        cam.MacoImage(0)
    with pytest.raises(ValueError, match="not valid; expected square images"):
        image_scores(bbs["vit"], sae, "vit", torch.rand(1, 3, 32, 30))
    with pytest.raises(ValueError, match="not valid; expected square images"):
        image_scores(bbs["vit"], sae, "vit", torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="reduce"):
        cam.concept("vit", 0, reduce="median")
    with pytest.raises(ValueError, match="parameterisation 'dct'"):
        cam.make_param("dct", 16)
    with pytest.raises(ValueError, match="CAM preset"):
        cam.cam_settings("huge")
    fresh = UniversalSAE({"vit": 24}, n_latents=8, k=2)
    with pytest.raises(ValueError, match="no standardisation"):
        cam.concept_head(fresh, "vit", 0)


# ------------------------------------------------------------------------------------------------ study
class FakeStore:
    """The ActivationStore surface top_exemplars reads: rows of one split, 4 tokens (2x2) per image."""

    def __init__(self, rows):
        self.splits, self.grid, self.tokens_per_image, self._rows = ("val",), 2, 4, rows

    def n_rows(self, split):
        return self._rows.shape[0]

    def rows(self, split, model, start, stop):
        return self._rows[start:stop].half()


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_top_exemplars_match_brute_force(models, reduce):
    _, sae = models
    rows = torch.randn(4 * 37, 24)
    ex = top_exemplars(sae, FakeStore(rows), "vit", 9, n=5, reduce=reduce, batch_images=10)
    pre = sae.encode_pre("vit", rows.half().float())[:, 9].view(37, 4)
    scores = pre.mean(1) if reduce == "mean" else pre.max(1).values
    order = torch.argsort(scores, descending=True)[:5]
    assert ex.image_ids.tolist() == order.tolist()
    torch.testing.assert_close(ex.scores, scores[order], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ex.maps, pre[order].view(5, 2, 2), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="n = 99"):
        top_exemplars(sae, FakeStore(rows), "vit", 9, n=99)


def test_image_scores_and_rank_match_brute_force(models):
    bbs, sae = models
    images = torch.rand(2, 3, SIZE, SIZE)
    pre, code = image_scores(bbs["vit"], sae, "vit", images, reduce="max")
    tokens = bbs["vit"](images).reshape(2, -1, 24)
    for i in range(2):
        x = sae.standardise("vit", tokens[i])
        torch.testing.assert_close(pre[i], sae.encode_pre("vit", x).max(0).values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(code[i], sae.encode("vit", x).to_dense().mean(0), atol=1e-5, rtol=1e-5)
    scores = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.0, 0.0]])
    assert concept_rank(scores, 2).tolist() == [2, 3]


def test_choose_concepts_prefers_universal_then_stand_ins_and_labels_them():
    from usae.cam.study import choose_concepts
    from usae.stats.firing import FiringStats

    # 3 models x 6 concepts: 0 universal (co-fires everywhere), 1 co-fires fairly, 2-4 owned by one model each
    fires = torch.tensor([[100, 50, 90, 1, 0, 5], [100, 40, 2, 80, 0, 5], [100, 60, 1, 1, 70, 5]])
    cofires = torch.tensor([80, 20, 0, 0, 0, 1])
    act = fires.double()
    stats = FiringStats(("a", "b", "c"), 0.1, 1000, fires, cofires, act, fires.clone(), torch.ones(3, 6).double())
    chosen = choose_concepts(stats, n_universal=2, n_unique=1)
    assert [c.k for c in chosen] == [0, 1, 2, 3, 4]
    assert chosen[0].label == "universal" and chosen[1].label.startswith("most co-firing (min CFP 0.33")
    assert [c.model for c in chosen[2:]] == ["a", "b", "c"]
    assert chosen[4].label == "unique to c" and chosen[2].kind == "unique"


def test_overlay_and_blend_shapes_and_ranges():
    from usae.viz.cam import blend, overlay

    images = torch.rand(2, 3, 16, 16)
    maps = torch.tensor([[[0.0, 1.0], [2.0, -1.0]]]).expand(2, 2, 2)
    out = overlay(images, maps, vmax=2.0)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[:, :, :8, :8], images[:, :, :8, :8] * 0.55)    # zero activation: image, dimmed
    alpha = torch.zeros(16, 16)
    alpha[4:12, 4:12] = 1.0
    faded = blend(images[0], alpha, percentile=90)
    torch.testing.assert_close(faded[:, 0, 0], torch.ones(3))                    # no gradient: background
    torch.testing.assert_close(faded[:, 8, 8], images[0, :, 8, 8])


def test_maco_centre_sets_the_colour_of_a_flat_image():
    spec = small_spectrum()
    param = cam.MacoImage(16, spectrum=spec, centre=(0.2, 0.3, 0.4))
    colour = torch.sigmoid(param.offset)   # what a zero standardised image becomes, per channel
    torch.testing.assert_close(colour, torch.tensor([0.2, 0.3, 0.4]))
    assert cam.MacoImage(16, spectrum=Spectrum(spec.magnitude, spec.colour_sqrt, {})).offset is None
