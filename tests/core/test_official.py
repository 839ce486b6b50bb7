"""Loading official-layout checkpoints (synthetic files with the released key layout)."""

import pytest
import torch

from usae.core.official import OFFICIAL_STANDARDISATION, find_official_checkpoints, load_official, official_state_dict

M = 32
K = 4
WIDTHS = {"SigLIP": 12, "DinoV2": 8, "ViT": 12}


def official_state(d, seed, bn=True):
    g = torch.Generator().manual_seed(seed)
    state = {
        "encoder.final_block.0.weight": torch.randn(M, d, generator=g),
        "encoder.final_block.0.bias": torch.randn(M, generator=g),
        "dictionary._weights": torch.randn(M, d, generator=g),
    }
    if bn:
        state.update({
            "encoder.final_block.1.weight": torch.rand(M, generator=g) + 0.5,
            "encoder.final_block.1.bias": torch.randn(M, generator=g),
            "encoder.final_block.1.running_mean": torch.randn(M, generator=g),
            "encoder.final_block.1.running_var": torch.rand(M, generator=g) + 0.5,
            "encoder.final_block.1.num_batches_tracked": torch.tensor(1234),
        })
    return state


def write_run(root, layouts=("flat", "model", "state_dict"), epochs=(0, 29)):
    """``weights/<run>/<Model>/uni_<Model>_checkpoint_<epoch>.pth`` as the official training writes them."""
    states = {}
    for position, ((name, d), layout) in enumerate(zip(WIDTHS.items(), layouts, strict=True)):
        folder = root / "run" / name
        folder.mkdir(parents=True)
        for epoch in epochs:
            state = official_state(d, seed=100 * position + epoch)
            states[(name, epoch)] = state
            if layout == "flat":
                obj = state
            else:
                opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                       "param_groups": [{"lr": 0.1}]}
                obj = {"epoch": epoch, layout: state, "optimizer": opt, "lr": 2.3e-4}
            torch.save(obj, folder / f"uni_{name}_checkpoint_{epoch}.pth")
    return states


def official_forward(state, x):
    """Official eval forward: Linear -> BN(running stats) -> ReLU -> TopK scatter -> codes @ normalise(W)."""
    h = x @ state["encoder.final_block.0.weight"].T + state["encoder.final_block.0.bias"]
    mean, var = state["encoder.final_block.1.running_mean"], state["encoder.final_block.1.running_var"]
    gamma, beta = state["encoder.final_block.1.weight"], state["encoder.final_block.1.bias"]
    h = (h - mean) / torch.sqrt(var + 1e-5) * gamma + beta
    relu = h.relu()
    top = relu.topk(K, dim=1)
    codes = torch.zeros_like(relu).scatter(1, top.indices, top.values)
    w = state["dictionary._weights"]
    return codes, codes @ (w / (w.norm(dim=1, keepdim=True) + 1e-8))


def test_load_official_directory(tmp_path):
    states = write_run(tmp_path)
    files = find_official_checkpoints(tmp_path)
    assert list(files) == ["SigLIP", "DinoV2", "ViT"]  # official model order
    assert all(p.name.endswith("_29.pth") for p in files.values())  # latest epoch
    assert find_official_checkpoints(tmp_path, epoch=0)["ViT"].name == "uni_ViT_checkpoint_0.pth"
    model = load_official(tmp_path, k=K)
    assert model.names == ("SigLIP", "DinoV2", "ViT") and model.n_latents == M and not model.training
    assert model.dims == WIDTHS and model.encoder_kind == "batchnorm"
    for name, d in WIDTHS.items():
        state = states[(name, 29)]
        x = torch.randn(10, d)
        codes, _ = official_forward(state, x)
        code = model.encode(name, x)
        torch.testing.assert_close(code.to_dense(), codes, rtol=1e-5, atol=1e-5)
        for target in WIDTHS:
            other_dictionary = states[(target, 29)]["dictionary._weights"]
            _, expected = official_forward({**state, "dictionary._weights": other_dictionary}, x)
            torch.testing.assert_close(model.decode(code, [target])[target], expected, rtol=1e-5, atol=1e-5)
        mean, std = model.standardisation(name)
        assert (mean.item(), std.item()) == pytest.approx(OFFICIAL_STANDARDISATION[name])
        assert model.coder(name).bn.num_batches_tracked.item() == 1234


def test_load_official_mapping_and_options(tmp_path):
    write_run(tmp_path, epochs=(29,))
    files = {"ViT": tmp_path / "run" / "ViT" / "uni_ViT_checkpoint_29.pth",
             "Mine": tmp_path / "run" / "DinoV2" / "uni_DinoV2_checkpoint_29.pth"}
    model = load_official(files, k=3, standardisation=None)
    assert model.names == ("ViT", "Mine") and model.k == 3
    assert model.standardisation("ViT") is None
    model = load_official(files, k=3)
    assert model.standardisation("ViT") is not None and model.standardisation("Mine") is None


def test_linear_encoder_checkpoints(tmp_path):
    torch.save(official_state(6, seed=1, bn=False), tmp_path / "uni_A_checkpoint_1.pth")
    model = load_official(tmp_path, k=2)
    assert model.encoder_kind == "linear" and model.names == ("A",)


def test_refuses_pickled_objects_and_bad_layouts(tmp_path):
    torch.save(torch.nn.Linear(3, 4), tmp_path / "uni_Obj_checkpoint_1.pth")
    with pytest.raises(ValueError, match="weights-only"):
        official_state_dict(tmp_path / "uni_Obj_checkpoint_1.pth")
    torch.save({"model": {"something": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="no 'dictionary._weights'"):
        official_state_dict(tmp_path / "x.pth")
    partial = official_state(5, seed=2)
    del partial["encoder.final_block.0.bias"]
    torch.save(partial, tmp_path / "p.pth")
    with pytest.raises(ValueError, match="missing"):
        official_state_dict(tmp_path / "p.pth")
    other = official_state(5, seed=3)
    other["dictionary._weights"] = torch.randn(M + 1, 5)
    torch.save(official_state(5, seed=4), tmp_path / "a.pth")
    torch.save(other, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="disagree on the number of latents"):
        load_official({"a": tmp_path / "a.pth", "b": tmp_path / "b.pth"})
    with pytest.raises(ValueError, match="not a directory"):
        load_official(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no uni_<Model>_checkpoint"):
        find_official_checkpoints(empty)
