import pytest

from usae.config import (
    BackboneSpec,
    ExperimentConfig,
    ExtractConfig,
    ToyWorldConfig,
    TrainConfig,
    USAEConfig,
    ZooTrainConfig,
    preset,
)


@pytest.mark.parametrize("name", ["smoke", "book", "paper"])
def test_presets_are_valid_and_round_trip(name):
    cfg = preset(name)
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.hash() == cfg.hash()


def test_hash_is_stable_and_content_sensitive():
    a, b = preset("book"), preset("book")
    assert a.hash() == b.hash()
    assert a.hash() != preset("book", train=a.train.replace(steps=a.train.steps + 1)).hash()
    # a known digest: the hash must not depend on the process (no Python hash(), no dict order)
    assert ToyWorldConfig().hash() == ToyWorldConfig.from_dict(ToyWorldConfig().to_dict()).hash()
    assert len(a.hash()) == 10 and int(a.hash(), 16) >= 0


def test_toy_backbones_default_to_the_zoo():
    cfg = preset("smoke")
    assert cfg.model_names == cfg.zoo.models
    assert all(not b.pretrained for b in cfg.backbones)


def test_paper_preset_uses_the_three_pinned_backbones():
    cfg = preset("paper")
    assert cfg.model_names == ("dinov2_vits14", "siglip_vitb16", "vit_b16")
    assert cfg.usae.k == 32 and cfg.usae.width({"a": 384, "b": 768}) == 6144
    assert cfg.train.lr == 3e-4 and cfg.train.weight_decay == 1e-5 and cfg.train.batch_size == 6272


@pytest.mark.parametrize("make, field", [
    (lambda: USAEConfig(n_latents=8, k=16), "k"),
    (lambda: USAEConfig(encoder="mlp"), "encoder"),
    (lambda: TrainConfig(loss="huber"), "loss"),
    (lambda: TrainConfig(lr=0.0), "lr"),
    (lambda: TrainConfig(steps=-1), "steps"),
    (lambda: ExtractConfig(dtype="int8"), "dtype"),
    (lambda: ToyWorldConfig(image_size=64, grid=7), "grid"),
    (lambda: ToyWorldConfig(min_objects=3, max_objects=2), "max_objects"),
    (lambda: ZooTrainConfig(models=()), "models"),
    (lambda: BackboneSpec(""), "name"),
    (lambda: ExperimentConfig(backbones=("toy_vit", "toy_vit")), "backbones"),
    (lambda: ExperimentConfig(backbones=("dinov2_vits14",)), "backbones"),
    (lambda: ExperimentConfig(device="tpu"), "device"),
])
def test_bad_values_name_the_field_and_the_value(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_unknown_preset_and_unknown_keys_are_clear():
    with pytest.raises(ValueError, match="'fast'.*smoke"):
        preset("fast")
    with pytest.raises(ValueError, match="unknown field.*'stepz'"):
        TrainConfig.from_dict({"stepz": 3})


def test_k_larger_than_derived_width_is_rejected():
    with pytest.raises(ValueError, match="k"):
        USAEConfig(expansion=1, k=64).width({"a": 32})


def test_one_seed_reaches_every_stage(monkeypatch):
    from usae.config import preset, seed_from_env, with_seed

    base = preset("book")
    s3 = with_seed(base, 3)
    assert (s3.toy.seed, s3.zoo.seed, s3.train.seed) == (3, 3, 3)
    for part in ("toy", "zoo", "train"):
        assert getattr(s3, part).hash() != getattr(base, part).hash()
    assert s3.usae == base.usae and s3.extract == base.extract
    monkeypatch.setenv("USAE_SEED", "7")
    assert seed_from_env() == 7
    monkeypatch.setenv("USAE_SEED", "seven")
    with pytest.raises(ValueError, match="USAE_SEED = 'seven' is not valid"):
        seed_from_env()
    with pytest.raises(ValueError, match="seed"):
        with_seed(base, -1)


def test_configs_written_before_the_standardise_spelling_still_load():
    old = preset("smoke").to_dict()
    old["extract"]["standardize"] = old["extract"].pop("standardise")
    assert ExperimentConfig.from_dict(old) == preset("smoke")
