import json
from pathlib import Path

import pytest
import torch

from usae.config import ToyWorldConfig, ZooTrainConfig
from usae.data import toyzoo
from usae.data.toyworld import FACTORS, LEVELS, ToyWorld
from usae.data.toyzoo_build import train_toy_zoo

# toy_mixer is the cheapest model; its texture and patch-colour heads learn fastest, so a few dozen steps beat chance
TINY = ZooTrainConfig(models=("toy_mixer",), n_train_images=384, n_val_images=160, steps=40, batch_size=32,
                      lr=3e-3, seed=0)


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(ToyWorldConfig())


@pytest.fixture(scope="module")
def trained(world: ToyWorld, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zoo") / "fresh"
    report = train_toy_zoo(world, TINY, out, progress=False)
    return out, report


def test_tasks_share_one_head_per_level_and_the_design_table_follows():
    assert set(toyzoo.TASKS) == {"toy_vit", "toy_convnext", "toy_mixer"}
    for tasks in toyzoo.TASKS.values():
        assert tasks[:len(toyzoo.SHARED_TASKS)] == toyzoo.SHARED_TASKS
    design = {d.factor: d for d in toyzoo.task_design()}
    assert set(design) == set(FACTORS)
    for d in design.values():   # brute force: a factor is needed by a model when one of its tasks names it
        need = {m for m, tasks in toyzoo.TASKS.items() if any(d.factor in t.factors for t in tasks)}
        assert set(d.models) == need
        assert d.expected == {3: "universal", 2: "pairwise", 1: "unique", 0: "none"}[len(need)]
        assert d.factor in LEVELS[d.level]
    # every level has a factor every model needs; the design has a pairwise and a unique factor
    for level in LEVELS:
        assert any(d.expected == "universal" for d in design.values() if d.level == level), level
    assert {d.expected for d in design.values()} >= {"universal", "pairwise", "unique"}
    assert [d.factor for d in toyzoo.task_design(("toy_vit", "toy_mixer")) if d.expected == "universal"] \
        == ["color", "texture", "shape", "object", "part"]
    with pytest.raises(ValueError, match="toy_resnet"):
        toyzoo.task_design(("toy_resnet",))


def test_average_precision_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 4, generator=gen)
    targets = (torch.rand(50, 4, generator=gen) < 0.3).float()
    targets[:, 3] = 0
    got = toyzoo.average_precision(scores, targets)
    for c in range(3):
        ranked = sorted(range(50), key=lambda i: -scores[i, c].item())
        hits, total = 0, 0.0
        for rank, i in enumerate(ranked, start=1):
            if targets[i, c] > 0:
                hits += 1
                total += hits / rank
        assert got[c].item() == pytest.approx(total / targets[:, c].sum().item(), abs=1e-9)
    assert torch.isnan(got[3])


def test_tiny_training_beats_chance(trained):
    _, report = trained
    r = report["toy_mixer"]
    assert r["metric"] == {t.name: "accuracy" for t in toyzoo.TASKS["toy_mixer"]}
    assert r["texture"] > r["chance"]["texture"] + 0.2
    assert r["patch_color"] > r["chance"]["patch_color"] + 0.1
    assert r["params"] > 100_000 and r["seconds"] > 0 and r["final_loss"] > 0


def test_files_written_and_no_temporaries_left(trained):
    out, report = trained
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "toy_mixer.heads.safetensors",
                                                    "toy_mixer.safetensors"]
    assert json.loads((out / "report.json").read_text()) == report
    assert sorted(p.name for p in out.parent.iterdir()) == ["fresh"]


def test_saved_weights_reload_to_identical_outputs(world: ToyWorld, trained):
    out, report = trained
    val = world.batch("val", 0, TINY.n_val_images)
    backbone = toyzoo.load_toy_backbone("toy_mixer", out)
    heads = toyzoo.load_toy_heads("toy_mixer", out)
    scores = toyzoo.evaluate(backbone, heads, val.images, toyzoo.task_labels(val))
    for task, s in scores.items():
        assert s["value"] == report["toy_mixer"][task]
    with torch.no_grad():
        a = backbone(val.images[:4])
        b = toyzoo.load_toy_backbone("toy_mixer", out)(val.images[:4])
    assert a.shape == (4, 8, 8, backbone.dim) and torch.equal(a, b)
    assert toyzoo.load_toy_backbone("toy_mixer", out, layer=2)(val.images[:2]).shape[:3] == (2, 8, 8)


def test_training_is_seeded(world: ToyWorld):
    cfg = TINY.replace(n_train_images=64, steps=3, batch_size=16)
    batch = world.batch("zoo", 0, 64)
    labels = toyzoo.task_labels(batch)
    runs = [toyzoo.train_one("toy_mixer", batch.images, labels, cfg, progress=False) for _ in range(2)]
    sa, sb = runs[0][0].model.state_dict(), runs[1][0].model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = toyzoo.train_one("toy_mixer", batch.images, labels, cfg.replace(seed=1), progress=False)
    assert not torch.equal(other[0].model.state_dict()["stem.proj.weight"], sa["stem.proj.weight"])


def test_bad_input_raises(world: ToyWorld, tmp_path: Path):
    with pytest.raises(ValueError, match="train the zoo first"):
        toyzoo.load_toy_backbone("toy_vit", tmp_path)


def test_patch_heads_score_every_token_and_ignore_absent_patches():
    heads = toyzoo.TaskHeads(6, (toyzoo.PATCH_SHAPE, toyzoo.TEXTURE))
    tokens = torch.randn(2, 8, 8, 6)
    out = heads(tokens)
    assert out["patch_shape"].shape == (2, 8, 8, toyzoo.PATCH_SHAPE.n_outputs)
    assert out["texture"].shape == (2, toyzoo.TEXTURE.n_outputs)
    # a linear head on each token: permuting tokens permutes the patch logits
    perm = torch.randperm(64)
    shuffled = tokens.flatten(1, 2)[:, perm].reshape(2, 8, 8, 6)
    assert torch.allclose(heads(shuffled)["patch_shape"].flatten(1, 2), out["patch_shape"].flatten(1, 2)[:, perm],
                          atol=1e-6)
    labels = {"patch.shape": torch.full((2, 8, 8), -1), "texture": torch.tensor([0, 1])}
    labels["patch.shape"][0, 0, 0] = 2
    loss = toyzoo._loss(out, labels, heads.tasks)
    want = (torch.nn.functional.cross_entropy(out["patch_shape"][0, 0, 0][None], torch.tensor([2]))
            + torch.nn.functional.cross_entropy(out["texture"], labels["texture"]))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    score = toyzoo._score(toyzoo.PATCH_SHAPE, out["patch_shape"], labels["patch.shape"])
    assert score["value"] == float(out["patch_shape"][0, 0, 0].argmax() == 2) and score["chance"] == 1.0


def test_step_scale_sets_each_models_steps():
    cfg = ZooTrainConfig(steps=40)
    assert [cfg.steps_of(n) for n in cfg.models] == [60, 20, 40]
    assert ZooTrainConfig(steps=1, step_scale=(("toy_mixer", 0.1),)).steps_of("toy_mixer") == 1
    assert ZooTrainConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ((("toy_vit", 0.0),), (("toy_vit",),), ("toy_vit",)):
        with pytest.raises(ValueError, match="step_scale"):
            ZooTrainConfig(step_scale=bad)
