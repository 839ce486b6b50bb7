"""Streaming R² matrix and self-reconstruction against whole-set brute force."""

import pytest
import torch

from usae.core.model import UniversalSAE
from usae.stats.reconstruction import R2Accumulator, r2_matrix, self_reconstruction

DIMS = {"a": 6, "b": 10, "c": 4}


def brute_r2(target, estimate, baseline):
    sse = (target - estimate).square().sum()
    centre = target.mean() if baseline == "global" else target.mean(0, keepdim=True)
    return 1 - sse / (target - centre).square().sum()


def test_accumulator_matches_whole_set_formulas():
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 2 + torch.arange(5.0) for n in (30, 17, 40)]
    estimates = [t + 0.5 * torch.randn(t.shape, generator=g, dtype=torch.float64) for t in targets]
    acc = R2Accumulator(["x", "y"], {"x": 3, "y": 5})
    for t, e in zip(targets, estimates, strict=True):
        acc.update(1, 1, t, e)
    full_t, full_e = torch.cat(targets), torch.cat(estimates)
    for baseline in ("global", "feature"):
        assert acc.matrix(baseline)[1, 1].item() == pytest.approx(brute_r2(full_t, full_e, baseline).item(), rel=1e-5)
    per_batch = [1 - (t - e).square().mean() / ((t - t.mean()).square().mean() + 1e-6)
                 for t, e in zip(targets, estimates, strict=True)]
    assert acc.matrix("batch_mean")[1, 1].item() == pytest.approx(torch.stack(per_batch).mean().item(), rel=1e-5)
    assert acc.mse()[1, 1].item() == pytest.approx((full_t - full_e).square().mean().item(), rel=1e-5)
    assert torch.isnan(acc.matrix()[0, 0])  # never updated
    assert acc.matrix("feature")[1, 1] < acc.matrix("global")[1, 1]  # per-feature means are a stronger baseline
    with pytest.raises(ValueError, match="baseline = 'x'"):
        acc.matrix("x")
    copy = R2Accumulator(["x", "y"], {"x": 3, "y": 5})
    copy.load_state(acc.state())
    assert torch.equal(copy.matrix().nan_to_num(), acc.matrix().nan_to_num())


def _model_and_data(n=300):
    torch.manual_seed(0)
    model = UniversalSAE(DIMS, 32, 4)
    model.train()
    data = {name: torch.randn(n, d) for name, d in DIMS.items()}
    for name in DIMS:  # give BN running statistics something to hold
        model.encode(name, data[name][:128])
    return model, data


def test_r2_matrix_streams_to_the_whole_set_answer():
    model, data = _model_and_data()
    streamed = r2_matrix(model, data, batch_size=64)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = torch.empty(3, 3, dtype=torch.float64)
        for i, src in enumerate(model.names):
            recon = model.decode(model.encode(src, data[src]))
            for j, tgt in enumerate(model.names):
                expected[i, j] = brute_r2(data[tgt].double(), recon[tgt].double(), "global")
    torch.testing.assert_close(streamed, expected, rtol=1e-4, atol=1e-4)
    feature = r2_matrix(model, data, batch_size=1000, baseline="feature")
    assert (feature <= streamed + 1e-9).all()


class FakeStore:
    """Minimal store: .batches(split, batch_size, shuffle, seed, drop_last, models)."""

    def __init__(self, data):
        self.data, self.calls = data, []

    def batches(self, split, batch_size, shuffle=True, seed=0, drop_last=True, models=None):
        self.calls.append((split, batch_size, shuffle, drop_last, tuple(models)))
        n = len(next(iter(self.data.values())))
        for start in range(0, n, batch_size):
            yield {m: self.data[m][start:start + batch_size] for m in models}


def test_store_source_gives_the_same_matrix():
    model, data = _model_and_data()
    store = FakeStore(data)
    torch.testing.assert_close(r2_matrix(model, store, batch_size=50), r2_matrix(model, data, batch_size=50))
    assert store.calls == [("val", 50, False, False, ("a", "b", "c"))]


def test_self_reconstruction_is_the_diagonal():
    model, data = _model_and_data()
    table = self_reconstruction(model, data, batch_size=128)
    full = r2_matrix(model, data, batch_size=128)
    assert list(table) == ["a", "b", "c"]
    for i, name in enumerate(model.names):
        assert table[name]["r2"] == pytest.approx(full[i, i].item(), rel=1e-6)
        var = data[name].double().var(unbiased=False).item()
        assert table[name]["r2"] == pytest.approx(1 - table[name]["mse"] / var, rel=1e-5)
        assert set(table[name]) == {"mse", "r2", "r2_feature", "r2_batch_mean"}


def test_bad_acts():
    model, data = _model_and_data()
    with pytest.raises(ValueError, match="missing model"):
        r2_matrix(model, {"a": data["a"]})
    with pytest.raises(ValueError, match="row count"):
        r2_matrix(model, {**data, "b": data["b"][:10]})
    with pytest.raises(ValueError, match="expected a dict"):
        r2_matrix(model, [1, 2, 3])
    with pytest.raises(ValueError, match="baseline"):
        r2_matrix(model, data, baseline="median")
    with pytest.raises(ValueError, match="no rows"):
        r2_matrix(model, {n: t[:0] for n, t in data.items()})
