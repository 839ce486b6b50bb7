"""UniversalSAE: encoders, decoders, standardisation, persistence, input validation."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from usae.core.model import UniversalSAE, normalise_rows
from usae.core.sparse import SparseCode

DIMS = {"vit": 12, "values": 7, "odd.name": 9}  # names that ModuleDict would reject work too


def make(encoder="batchnorm", m=40, k=5, seed=0):
    torch.manual_seed(seed)
    return UniversalSAE(DIMS, m, k, encoder)


def reference_encode(model, name, x):
    """Official forward: Linear -> BN -> ReLU -> scatter(topk) (dense)."""
    coder = model.coder(name)
    h = x @ coder.linear.weight.T + coder.linear.bias
    if coder.bn is not None:
        bn = coder.bn
        if model.training:
            mean, var = h.mean(0), h.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    relu = h.relu()
    top = relu.topk(model.k, dim=1)
    return torch.zeros_like(relu).scatter(1, top.indices, top.values)


@pytest.mark.parametrize("encoder", ["batchnorm", "linear"])
@pytest.mark.parametrize("train", [True, False])
def test_encode_and_decode_match_dense_reference(encoder, train):
    model = make(encoder)
    model.train(train)
    x = torch.randn(30, DIMS["values"])
    code = model.encode("values", x)
    assert isinstance(code, SparseCode) and code.values.shape == (30, 5) and code.n_latents == 40
    dense = reference_encode(model, "values", x)
    torch.testing.assert_close(code.to_dense(), dense)
    recon = model.decode(code)
    assert list(recon) == list(model.names)
    for name, out in recon.items():
        raw = model.coder(name).dictionary
        expected = dense @ (raw / (raw.norm(dim=1, keepdim=True) + 1e-8))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert out.shape == (30, DIMS[name])


def test_encode_pre_is_post_bn_pre_relu():
    model = make().eval()
    x = torch.randn(8, 12)
    pre = model.encode_pre("vit", x)
    coder = model.coder("vit")
    torch.testing.assert_close(pre, coder.bn(coder.linear(x)))
    assert (pre < 0).any()


def test_names_dims_and_parameter_groups():
    model = make()
    assert model.names == ("vit", "values", "odd.name")
    assert model.index("odd.name") == 2
    params = model.model_parameters("values")
    coder = model.coder("values")
    assert len(params) == 5  # linear W, b, BN gamma, beta, dictionary
    assert params[-1] is coder.dictionary
    assert sum(p.numel() for n in model.names for p in model.model_parameters(n)) == \
        sum(p.numel() for p in model.parameters())
    assert len(make("linear").model_parameters("vit")) == 3


def test_dictionary_rows_have_unit_norm_and_no_bias():
    model = make()
    for name in model.names:
        torch.testing.assert_close(model.dictionary(name).norm(dim=1), torch.ones(40))
    zero = SparseCode(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.int64), 40)
    assert all(out.abs().max() == 0 for out in model.decode(zero).values())
    torch.testing.assert_close(normalise_rows(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))


def test_decode_targets_and_frozen():
    model = make()
    code = model.encode("vit", torch.randn(6, 12))
    out = model.decode(code, ["values"], frozen=["values"])
    assert list(out) == ["values"]
    assert out["values"].requires_grad  # through the encoder
    out["values"].sum().backward()
    assert model.coder("values").dictionary.grad is None
    assert model.coder("vit").linear.weight.grad is not None


def test_any_number_of_models():
    torch.manual_seed(0)
    single = UniversalSAE({"only": 5}, 16, 2)
    assert single.decode(single.encode("only", torch.randn(4, 5)))["only"].shape == (4, 5)
    many = UniversalSAE({f"m{i}": 3 + i for i in range(6)}, 16, 2, "linear")
    out = many.decode(many.encode("m4", torch.randn(4, 7)))
    assert [o.shape[1] for o in out.values()] == [3, 4, 5, 6, 7, 8]


def test_invalid_construction():
    with pytest.raises(ValueError, match="k = 41"):
        UniversalSAE(DIMS, 40, 41)
    with pytest.raises(ValueError, match="encoder = 'mlp'"):
        UniversalSAE(DIMS, 40, 4, "mlp")
    with pytest.raises(ValueError, match="dims"):
        UniversalSAE({}, 40, 4)
    with pytest.raises(ValueError, match=r"dims\['a'\] = 0"):
        UniversalSAE({"a": 0}, 40, 4)
    with pytest.raises(ValueError, match="n_latents"):
        UniversalSAE({"a": 3}, 0, 1)


def test_invalid_encode_decode_input():
    model = make()
    with pytest.raises(ValueError, match="model 'dino' is not valid"):
        model.encode("dino", torch.randn(3, 12))
    with pytest.raises(ValueError, match=r"expected \[N, 12\]"):
        model.encode("vit", torch.randn(3, 7))
    with pytest.raises(ValueError, match="n_latents=39"):
        model.decode(SparseCode(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.int64), 39))


def test_check_batch_errors():
    model = make()
    good = {n: torch.randn(4, d) for n, d in DIMS.items()}
    assert list(model.check_batch({**good, "extra": torch.zeros(1)})) == list(DIMS)
    with pytest.raises(ValueError, match="missing model"):
        model.check_batch({"vit": good["vit"]})
    with pytest.raises(ValueError, match="row count"):
        model.check_batch({**good, "vit": torch.randn(5, 12)})
    with pytest.raises(ValueError, match=r"\[N, 7\]"):
        model.check_batch({**good, "values": torch.randn(4, 8)})
    bad = good["vit"].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.check_batch({**good, "vit": bad})
    with pytest.raises(ValueError, match="expected a dict"):
        model.check_batch(torch.randn(4, 12))


def test_standardisation_apply_and_validation():
    model = make()
    assert model.standardisation("vit") is None
    with pytest.raises(ValueError, match="no standardisation"):
        model.standardise("vit", torch.randn(2, 12))
    model.set_standardisation("vit", 0.5, 2.0)
    raw = torch.randn(3, 12)
    torch.testing.assert_close(model.standardise("vit", raw), (raw - 0.5) / (2.0 + 1e-5))
    mean, std = torch.randn(7), torch.rand(7) + 0.5
    model.set_standardisation("values", mean, std)
    torch.testing.assert_close(model.standardise("values", raw[:, :7]), (raw[:, :7] - mean) / (std + 1e-5))
    with pytest.raises(ValueError, match=r"expected \[\] or \[9\]"):
        model.set_standardisation("odd.name", torch.zeros(3), 1.0)


def test_save_load_round_trip(tmp_path):
    model = make()
    model.train()
    for name in model.names:  # move BN running statistics away from their init
        model.encode(name, torch.randn(16, DIMS[name]) * 3 + 1)
    model.set_standardisation("vit", -0.03, 2.23)
    model.set_standardisation("values", torch.randn(7), torch.rand(7) + 1)
    path = model.save(tmp_path / "sub" / "usae.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["usae.safetensors"]  # no temp file left
    loaded = UniversalSAE.load(path)
    assert loaded.config() == model.config() and loaded.names == model.names
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.standardisation("odd.name") is None
    model.eval()
    loaded.eval()
    x = torch.randn(10, 9)
    code_a, code_b = model.encode("odd.name", x), loaded.encode("odd.name", x)
    assert torch.equal(code_a.indices, code_b.indices)
    pairs = zip(model.decode(code_a).values(), loaded.decode(code_b).values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_load_rejects_foreign_files(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a UniversalSAE file"):
        UniversalSAE.load(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        UniversalSAE.load(junk)
    small = UniversalSAE({"a": 3}, 8, 2)
    with pytest.raises(ValueError, match="does not match"):
        small.load_tensors(make().state_dict())


def test_gradients_reach_encoder_and_selected_decoders_only():
    model = make("linear")
    code = model.encode("vit", torch.randn(12, 12))
    loss = sum(F.mse_loss(out, torch.zeros_like(out)) for out in model.decode(code, frozen=["vit"]).values())
    loss.backward()
    assert model.coder("vit").linear.weight.grad is not None
    assert model.coder("vit").dictionary.grad is None
    assert model.coder("values").dictionary.grad is not None
    assert model.coder("values").linear.weight.grad is None


def test_normalise_rows_gradient_matches_autograd():
    raw = torch.randn(6, 4, dtype=torch.float64)
    raw[2] = 0.0  # a zero row stays zero
    upstream = torch.randn(6, 4, dtype=torch.float64)
    grads = []
    for fn in (normalise_rows, lambda w: w / (w.norm(dim=1, keepdim=True) + 1e-8)):
        w = raw.clone().requires_grad_()
        (fn(w) * upstream).sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(*grads)
    assert normalise_rows(raw)[2].abs().sum() == 0


def test_frozen_dictionary_is_cached_until_the_weight_changes():
    model = make()
    first = model.dictionary("vit", frozen=True)
    assert not first.requires_grad and model.dictionary("vit", frozen=True) is first
    torch.testing.assert_close(first, model.dictionary("vit").detach())
    with torch.no_grad():
        model.coder("vit").dictionary.mul_(2.0).add_(1.0)  # an in-place update, like an optimizer step
    again = model.dictionary("vit", frozen=True)
    assert again is not first
    torch.testing.assert_close(again, model.dictionary("vit").detach())


@pytest.mark.parametrize("encoder", ["batchnorm", "linear"])
def test_encode_train_matches_encode_in_training_mode(encoder):
    model = make(encoder)
    reference = make(encoder)
    x = torch.randn(30, DIMS["vit"])
    dead = torch.zeros(40, dtype=torch.bool)
    dead[[3, 17, 30]] = True
    code, pre_dead, columns = model.train().encode_train("vit", x, dead=dead)
    expected = reference.train().encode("vit", x)
    torch.testing.assert_close(code.to_dense(), expected.to_dense(), rtol=1e-5, atol=1e-5)
    assert columns.tolist() == [3, 17, 30]
    torch.testing.assert_close(pre_dead, reference.encode_pre("vit", x)[:, columns].detach(), rtol=1e-5, atol=1e-5)
    assert model.encode_train("vit", x, dead=torch.zeros(40, dtype=torch.bool)).dead_pre is None
    with pytest.raises(ValueError, match="dead must be bool"):
        model.encode_train("vit", x, dead=torch.zeros(39, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected \[N, 12\]"):
        model.encode_train("vit", torch.randn(4, 7))


def test_saved_files_follow_the_umask_so_a_shared_cache_can_read_them(tmp_path):
    import os

    before = os.umask(0o022)
    try:
        path = UniversalSAE({"a": 4, "b": 6}, 8, 2).save(tmp_path / "usae.safetensors")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o002)
        path = UniversalSAE({"a": 4, "b": 6}, 8, 2).save(tmp_path / "usae2.safetensors")
        assert path.stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(before)
