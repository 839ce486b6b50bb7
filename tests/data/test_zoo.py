"""Tests of usae.data.zoo: the registry, token geometry of real and toy backbones, layers, preprocessing, loading."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from usae.config import PAPER_BACKBONES, BackboneSpec
from usae.data import zoo
from usae.data.zoo import REGISTRY, Backbone, create_model, get_entry, load_backbone

REAL = sorted(n for n, e in REGISTRY.items() if not e.toy)
TOYS = ("toy_vit", "toy_convnext", "toy_mixer")


def test_registry_has_the_required_models():
    for name in (*PAPER_BACKBONES, "clip_vitb16", "convnext_tiny", "resnet50", *TOYS):
        assert name in REGISTRY and get_entry(name).name == name
    assert get_entry("dinov2_vits14").timm_id == "vit_small_patch14_dinov2.lvd142m"
    assert get_entry("siglip_vitb16").timm_id == "vit_base_patch16_siglip_224.webli"
    assert get_entry("vit_b16").timm_id == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert (get_entry("dinov2_vits14").grid, get_entry("siglip_vitb16").n_prefix) == (16, 0)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="toy_vit.*timm model id"):
        get_entry("nope")
    with pytest.raises(ValueError, match="timm cannot build"):
        get_entry("resnet18.no_such_tag")


# any timm id, not in the registry: one model per family (registers, ConvNeXt, ResNet, Swin, Mixer)
TIMM_IDS = {"vit_little_patch16_reg4_gap_256": ("vit", 4, 256, 16), "convnext_atto.d2_in1k": ("cnn", 0, 224, 7),
            "resnet18.a1_in1k": ("cnn", 0, 224, 7), "swin_tiny_patch4_window7_224": ("cnn", 0, 224, 7),
            "mixer_s16_224": ("mixer", 0, 224, 14)}


@pytest.mark.parametrize("model_id", sorted(TIMM_IDS))
def test_any_timm_id_gets_its_geometry_from_timm_metadata(model_id):
    family, n_prefix, size, grid = TIMM_IDS[model_id]
    entry = get_entry(model_id)
    assert model_id not in REGISTRY and entry.name == model_id and entry.timm_id == model_id
    assert (entry.family, entry.n_prefix, entry.image_size, entry.grid) == (family, n_prefix, size, grid)
    cfg = timm.get_pretrained_cfg(model_id).to_dict()
    assert entry.mean == tuple(cfg["mean"]) and entry.std == tuple(cfg["std"])
    torch.manual_seed(0)
    with torch.no_grad():
        final = load_backbone(BackboneSpec(model_id, pretrained=False))(torch.rand(2, 3, 20, 28))
        assert final.shape == (2, grid, grid, entry.dim)
        layers = zoo.list_layers(model_id)
        chosen = layers[-2]
        inner = load_backbone(BackboneSpec(model_id, layer=chosen.index, pretrained=False))
        assert (inner.grid, inner.dim) == (chosen.grid, chosen.dim)
        assert inner(torch.rand(1, 3, 16, 16)).shape == (1, chosen.grid, chosen.grid, chosen.dim)


@pytest.mark.parametrize("name", REAL)
def test_real_entries_match_timm_preprocessing(name):
    entry = get_entry(name)
    cfg = timm.models.get_pretrained_cfg(entry.timm_id)
    assert cfg is not None and cfg.hf_hub_id
    assert entry.mean == pytest.approx(cfg.mean) and entry.std == pytest.approx(cfg.std)


def _shallow(entry):
    """The real architecture with fewer blocks (same stem, prefix tokens, width, norms): fast to build."""
    kwargs = dict(entry.kwargs)
    if entry.family == "vit":
        kwargs["depth"] = 1
    elif entry.arch.startswith("convnext"):
        kwargs["depths"] = (1, 1, 1, 1)
    else:
        kwargs["layers"] = (1, 1, 1, 1)
    return timm.create_model(entry.arch, pretrained=False, num_classes=0, **kwargs).eval()


@pytest.mark.parametrize("name", REAL)
def test_real_architectures_give_the_registered_grid(name):
    entry = get_entry(name)
    model = _shallow(entry)
    assert model.num_features == entry.dim
    if entry.family == "vit":
        assert model.num_prefix_tokens == entry.n_prefix
    backbone = Backbone(entry, model)
    last = Backbone(entry, model, layer=-1)
    x = torch.rand(1, 3, 40, 40)  # resized to entry.image_size inside
    with torch.no_grad():
        tokens, last_tokens = backbone(x), last(x)
    assert tokens.shape == (1, entry.grid, entry.grid, entry.dim)
    assert last_tokens.shape == (1, last.grid, last.grid, last.dim) == (1, entry.grid, entry.grid, entry.dim)
    assert torch.isfinite(tokens).all()


def test_full_dinov2_through_load_backbone():
    torch.manual_seed(0)
    backbone = load_backbone(BackboneSpec("dinov2_vits14", pretrained=False))
    entry = backbone.entry
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        tokens = backbone(x)
        feats = backbone.model.forward_features(backbone.preprocess(x))
    assert tokens.shape == (1, entry.grid, entry.grid, entry.dim)
    assert feats.shape[1] == entry.grid ** 2 + entry.n_prefix  # prefix tokens were dropped
    torch.testing.assert_close(tokens.reshape(1, -1, entry.dim), feats[:, entry.n_prefix:])


@pytest.mark.parametrize("name", TOYS)
def test_toy_models(name):
    torch.manual_seed(0)
    backbone = load_backbone(BackboneSpec(name, pretrained=False))
    n_params = sum(p.numel() for p in backbone.parameters())
    assert 300_000 <= n_params <= 1_000_000
    assert (backbone.grid, backbone.dim) == (8, get_entry(name).dim)
    with torch.no_grad():
        a = backbone(torch.rand(2, 3, 64, 64))
        b = backbone(torch.rand(2, 3, 48, 80))  # squashed to 64x64
    assert a.shape == b.shape == (2, 8, 8, backbone.dim)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_vit_layers():
    torch.manual_seed(0)
    model = create_model("toy_vit", pretrained=False)
    entry = get_entry("toy_vit")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        final = Backbone(entry, model)(x)
        last = Backbone(entry, model, layer=-1)(x)
        first = Backbone(entry, model, layer=0)(x)
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(Backbone(entry, model).preprocess(x)))))
        outs = []
        for blk in model.blocks:
            h = blk(h)
            outs.append(h)
    grid = lambda t: t[:, 1:].reshape(2, 8, 8, -1)  # noqa: E731
    torch.testing.assert_close(last, grid(outs[-1]))  # layer -1: last block output, before the final norm
    torch.testing.assert_close(first, grid(outs[0]))
    torch.testing.assert_close(final, grid(model.norm(outs[-1])))  # layer None: after the final norm
    assert not torch.allclose(last, final)


def test_cnn_layers_are_stages():
    torch.manual_seed(0)
    model = create_model("toy_convnext", pretrained=False)
    entry = get_entry("toy_convnext")
    x = torch.rand(1, 3, 64, 64)
    stage0 = Backbone(entry, model, layer=0)
    assert (stage0.grid, stage0.dim) == (64, 16)
    with torch.no_grad():
        torch.testing.assert_close(Backbone(entry, model, layer=-1)(x), Backbone(entry, model)(x))
        assert stage0(x).shape == (1, 64, 64, 16)
    with pytest.raises(ValueError, match="out of range"):
        Backbone(entry, model, layer=4)


def test_preprocess_resizes_and_normalises():
    backbone = load_backbone(BackboneSpec("toy_mixer", pretrained=False))
    x = torch.rand(2, 3, 32, 32)
    ref = F.interpolate(x, size=(64, 64), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(backbone.preprocess(x), (ref - 0.5) / 0.5)
    y = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(backbone.preprocess(y), (y - 0.5) / 0.5)
    for bad in (torch.rand(3, 64, 64), torch.rand(1, 1, 64, 64), torch.zeros(1, 3, 64, 64, dtype=torch.uint8)):
        with pytest.raises(ValueError):
            backbone(bad)


def test_backbone_stays_in_eval_mode():
    backbone = load_backbone(BackboneSpec("toy_vit", pretrained=False))
    backbone.train()
    assert not backbone.model.training


def test_pretrained_offline_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(zoo, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    offline_before = constants.HF_HUB_OFFLINE
    with pytest.raises(RuntimeError) as info:
        create_model("resnet50", pretrained=True)
    msg = str(info.value)
    assert "resnet50" in msg and "resnet50.a1_in1k" in msg and "could not be downloaded" in msg
    assert "pretrained=False" in msg
    assert constants.HF_HUB_OFFLINE == offline_before  # the temporary offline switch was undone


def test_pretrained_weights_load_offline_from_a_prepopulated_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zoo._hub_reachable() is False
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    state = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v
             for k, v in create_model("resnet50", pretrained=False).state_dict().items()}
    commit = "0" * 40
    repo = tmp_path / "models--timm--resnet50.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    model = create_model("resnet50", pretrained=True)
    assert torch.all(model.conv1.weight == 0.25)


def test_toy_models_have_no_published_weights():
    with pytest.raises(ValueError, match="toy"):
        create_model("toy_vit", pretrained=True)


def test_load_backbone_from_safetensors(tmp_path):
    torch.manual_seed(0)
    trained = create_model("toy_mixer", pretrained=False)
    path = tmp_path / "toy_mixer.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    spec = BackboneSpec("toy_mixer", pretrained=False)
    loaded = load_backbone(spec, weights=path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), Backbone(get_entry("toy_mixer"), trained)(x))
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone(BackboneSpec("toy_vit", pretrained=False), weights=path)
    with pytest.raises(ValueError, match="not a file"):
        load_backbone(spec, weights=tmp_path / "missing.safetensors")
