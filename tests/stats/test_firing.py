"""usae.stats.firing: streaming fires / co-fires / energy / entropy against dense brute-force references."""

import math

import numpy as np
import pytest
import torch

from usae.core.model import UniversalSAE
from usae.core.sparse import SparseCode
from usae.stats.concepts import concept_order, pairwise_concepts, unique_concepts, universal_concepts
from usae.stats.firing import FiringAccumulator, FiringStats, firing_stats
from usae.stats.universality import cfp_curves, energy_cofire_fit, loglog_fit

NAMES = ("a", "b", "c")
LEVELS = torch.tensor([0.0, 0.05, 0.1, 0.1, 0.2, 0.7, 1.5])  # 0, below, exactly at tau (not firing), above


def random_codes(n: int, m: int, k: int, seed: int, names=NAMES) -> dict[str, SparseCode]:
    """Codes with distinct indices per row, overlapping across models, values with ties at tau."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, m, generator=g)
    codes = {}
    for name in names:
        scores = base + 0.6 * torch.rand(n, m, generator=g)  # shared preference -> frequent co-fires
        idx = scores.topk(k, dim=1).indices
        vals = LEVELS[torch.randint(len(LEVELS), (n, k), generator=g)]
        codes[name] = SparseCode(vals.float(), idx, m)
    return codes


def dense_reference(batches: list[dict[str, SparseCode]], names, tau: float) -> dict[str, torch.Tensor]:
    z = torch.stack([torch.cat([b[n].to_dense() for b in batches]) for n in names])  # [M, N, m]
    return {"fires": (z > tau).sum(1), "cofires": (z > tau).all(0).sum(0), "activation_sum": z.double().sum(1),
            "nonzero": (z > 0).sum(1), "n_tokens": z.shape[1]}


def stats_from_fires(fires, cofires=None) -> FiringStats:
    fires = torch.as_tensor(fires, dtype=torch.int64)
    m = fires.shape[1]
    cof = torch.zeros(m, dtype=torch.int64) if cofires is None else torch.as_tensor(cofires, dtype=torch.int64)
    names = tuple(f"m{i}" for i in range(fires.shape[0]))
    return FiringStats(names, 0.1, 100, fires, cof, fires.double(), fires.clone(), torch.ones(fires.shape).double())


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("tau", [0.1, 0.0])
def test_counts_match_dense_reference(tau, backend):
    batches = [random_codes(n, 10, 4, seed) for seed, n in enumerate((37, 1, 64))]
    acc = FiringAccumulator(NAMES, 10, threshold=tau, backend=backend)
    for b in batches:
        acc.update(b)
    s, ref = acc.result(), dense_reference(batches, NAMES, tau)
    assert s.n_tokens == ref["n_tokens"] == 102
    for key in ("fires", "cofires", "nonzero"):
        assert torch.equal(getattr(s, key), ref[key]), key
    assert torch.allclose(s.activation_sum, ref["activation_sum"])
    assert s.cofires.sum() > 0 and (s.cofires < s.fires.min(0).values + 1).all()
    # batching does not change anything
    one = FiringAccumulator(NAMES, 10, threshold=tau, backend=backend)
    one.update({n: SparseCode(torch.cat([b[n].values for b in batches]), torch.cat([b[n].indices for b in batches]),
                              10) for n in NAMES})
    assert torch.equal(one.result().cofires, s.cofires) and torch.equal(one.result().fires, s.fires)


def test_derived_statistics_match_numpy():
    batches = [random_codes(50, 12, 3, 7)]
    acc = FiringAccumulator(NAMES, 12)
    acc.update(batches[0])
    s, ref = acc.result(), dense_reference(batches, NAMES, 0.1)
    f = ref["fires"].double().numpy()
    mean = ref["activation_sum"].numpy() / 50
    assert np.allclose(s.mean_activation.numpy(), mean)
    assert np.allclose(s.energy.numpy(), mean**2) and np.allclose(s.energy_code.numpy(), mean)
    assert np.allclose(s.aggregated_energy.numpy(), (mean**2).sum(0))
    assert np.allclose(s.aggregated_energy_of("code", "mean").numpy(), mean.mean(0))
    for k in range(12):
        tot = f[:, k].sum()
        if tot == 0:
            assert math.isnan(s.entropy[k]) and s.never_fired[k]
            continue
        p = f[:, k] / tot
        h = -sum(x * math.log(x) for x in p if x > 0) / math.log(3)
        assert s.entropy[k].item() == pytest.approx(h, abs=1e-12)
        assert s.cofire_iou[k].item() == pytest.approx(ref["cofires"][k].item() / tot)
        for i in range(3):
            if f[i, k] > 0:
                assert s.cofire_proportion[i, k].item() == pytest.approx(ref["cofires"][k].item() / f[i, k])
            else:
                assert math.isnan(s.cofire_proportion[i, k])


def test_entropy_hand_made_cases():
    s = stats_from_fires([[5, 4, 7, 0, 3],
                          [0, 4, 7, 0, 0],
                          [0, 4, 0, 0, 0]])
    h = s.entropy
    assert h[0].item() == pytest.approx(0.0)                       # one model only
    assert h[1].item() == pytest.approx(1.0)                       # uniform over all three
    assert h[2].item() == pytest.approx(math.log(2) / math.log(3))  # exactly two of three: 0.631
    assert h[2].item() == pytest.approx(0.6309, abs=1e-4)
    assert math.isnan(h[3].item()) and s.never_fired.tolist() == [False, False, False, True, False]
    assert s.entropy_code[3].item() == 0.0                         # the official code mixes it into 0
    assert torch.allclose(s.entropy_code[:3], h[:3], atol=1e-6)
    assert s.dead[:, 3].all() and s.dead[1, 0] and not s.dead[0, 0]
    assert s.dead_fraction()["m2"]["after"] == pytest.approx(4 / 5)


def test_atom_norms_scale_energy():
    acc = FiringAccumulator(NAMES, 10)
    acc.update(random_codes(20, 10, 3, 3))
    norms = torch.full((3, 10), 2.0, dtype=torch.float64)
    s1, s2 = acc.result(), acc.result(norms)
    assert torch.allclose(s2.energy, 4 * s1.energy) and torch.allclose(s2.energy_code, 2 * s1.energy_code)
    with pytest.raises(ValueError, match="atom_norms"):
        acc.result(torch.ones(2, 10))


def test_bad_input_is_rejected():
    acc = FiringAccumulator(NAMES, 10)
    codes = random_codes(4, 10, 2, 0)
    with pytest.raises(ValueError, match="expected exactly"):
        acc.update({"a": codes["a"]})
    with pytest.raises(ValueError, match="n_latents"):
        acc.update({**codes, "c": SparseCode(codes["c"].values, codes["c"].indices, 11)})
    with pytest.raises(ValueError, match="tokens"):
        acc.update({**codes, "c": random_codes(5, 10, 2, 0)["c"]})
    with pytest.raises(ValueError, match="threshold"):
        FiringAccumulator(NAMES, 10, threshold=-1.0)
    with pytest.raises(ValueError, match="variant"):
        acc.result().energy_of("squared")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_model_counts_and_backends_agree(backend):
    solo = FiringAccumulator(("solo",), 8, backend=backend)
    solo.update(random_codes(30, 8, 3, 1, names=("solo",)))
    assert torch.equal(solo.result().cofires, solo.result().fires[0])
    names = ("a", "b", "c", "d", "e")
    codes = random_codes(300, 9, 5, 2, names=names)
    for n in names:  # float16 values and a two-model subset too
        codes[n] = SparseCode(codes[n].values.half(), codes[n].indices, 9)
    ref = dense_reference([codes], names, 0.1)
    for subset in (names, names[:2]):
        acc = FiringAccumulator(subset, 9, backend=backend)
        acc.update({n: codes[n] for n in subset})
        assert torch.equal(acc.result().cofires, dense_reference([codes], subset, 0.1)["cofires"])
    assert torch.equal(acc.result().fires, ref["fires"][:2])
    with pytest.raises(ValueError, match="has indices in"):
        acc.update({n: SparseCode(codes[n].values, codes[n].indices + 1, 9) for n in names[:2]})
    with pytest.raises(ValueError, match="backend"):
        FiringAccumulator(names, 9, backend="jax")


def test_loglog_fit_recovers_planted_power_law():
    x = torch.tensor([1.0, 10.0, 100.0, 1000.0, 0.0, 5.0])
    y = 0.01 * x**0.5
    y[5] = 0.0  # dropped: both must be > 0
    fit = loglog_fit(x, y)
    assert fit.n_concepts == 4 and fit.slope == pytest.approx(0.5) and fit.pearson_r == pytest.approx(1.0)
    assert fit.intercept == pytest.approx(-2.0)
    assert math.isnan(loglog_fit(torch.ones(3), torch.ones(3)).slope)


def test_energy_cofire_fit_threshold_and_order():
    s = stats_from_fires([[1, 10, 100, 1000, 0], [1, 10, 100, 1000, 0]], cofires=[1, 10, 100, 1000, 0])
    s.activation_sum = torch.tensor([[1.0, 10, 100, 1000, 0]] * 2).double() ** 1.5  # energy_code ∝ cofires^1.5
    full, big = energy_cofire_fit(s), energy_cofire_fit(s, min_cofires=100)
    assert full.n_concepts == 4 and big.n_concepts == 2
    assert full.slope == pytest.approx(1.5) and big.slope == pytest.approx(1.5)
    assert energy_cofire_fit(s, variant="eq9").slope == pytest.approx(3.0)
    assert concept_order(s).tolist() == [3, 2, 1, 0, 4]
    curves, means = cfp_curves(s, top=3)
    assert curves.shape == (2, 3) and torch.allclose(means, torch.ones(2, dtype=torch.float64))


def test_selection_helpers():
    # c0 universal, c1 uniform but never co-firing, c2 pair (m0, m2), c3 unique to m1, c4 never fires
    s = stats_from_fires([[10, 10, 10, 0, 0], [10, 10, 0, 20, 0], [10, 10, 10, 0, 0]], cofires=[8, 0, 0, 0, 0])
    s.activation_sum = torch.tensor([[1.0, 2, 3, 4, 0]] * 3).double()
    assert universal_concepts(s).tolist() == [0]
    ids, pairs = pairwise_concepts(s)
    assert ids.tolist() == [2] and pairs.tolist() == [[0, 2]]
    ids, dominant = unique_concepts(s)
    assert ids.tolist() == [3] and dominant.tolist() == [1]
    with pytest.raises(ValueError, match="3 models"):
        pairwise_concepts(stats_from_fires([[1], [1]]))


def test_firing_stats_end_to_end_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = UniversalSAE({"a": 6, "b": 5, "c": 4}, n_latents=16, k=3)
    model.train()
    acts = {"a": torch.randn(70, 6), "b": torch.randn(70, 5), "c": torch.randn(70, 4)}
    s = firing_stats(model, acts, threshold=0.0, batch_size=16, progress=False)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        ref = dense_reference([{n: model.encode(n, acts[n]) for n in model.names}], model.names, 0.0)
    for key in ("fires", "cofires", "nonzero"):
        assert torch.equal(getattr(s, key), ref[key]), key
    assert torch.allclose(s.activation_sum, ref["activation_sum"], atol=1e-5)
    assert torch.allclose(s.atom_norms, torch.ones(3, 16, dtype=torch.float64), atol=1e-6)
    batches = [{n: acts[n][i:i + 30] for n in acts} for i in range(0, 70, 30)]
    s2 = firing_stats(model, batches, threshold=0.0, progress=False)
    assert torch.equal(s2.cofires, s.cofires)
    s.save(tmp_path / "f.safetensors")
    back = FiringStats.load(tmp_path / "f.safetensors")
    assert back.names == s.names and back.n_tokens == 70 and back.threshold == 0.0
    assert torch.equal(back.cofires, s.cofires) and torch.equal(back.activation_sum, s.activation_sum)
    with pytest.raises(ValueError, match="missing"):
        firing_stats(model, {"a": acts["a"]}, progress=False)


def test_bench_generator_and_small_bench_run():
    from usae.perf.stats import SyntheticCodes, bench_firing

    src = SyntheticCodes(n_models=3, n_latents=64, k=16, seed=4)
    a, b = src.batch(2, 50), src.batch(2, 50)
    assert all(torch.equal(a[n].indices, b[n].indices) and torch.equal(a[n].values, b[n].values) for n in a)
    for code in a.values():  # distinct indices per row, in range
        s = code.indices.sort(dim=1).values
        assert (s[:, 1:] != s[:, :-1]).all() and int(s.min()) >= 0 and int(s.max()) < 64
    r = bench_firing(n_tokens=2500, n_latents=128, k=8, batch=1000, dense_sample=300, progress=False)
    assert r["agrees_with_dense"] is True and r["n_tokens"] == 2500
    assert r["peak_rss_gb"] >= r["baseline_rss_gb"] > 0 and r["mean_cofires_per_token"] > 0


def test_median_fires_and_top_share_describe_the_spread_of_firing():
    fires = torch.zeros(2, 200, dtype=torch.int64)
    fires[0, :100] = torch.arange(1, 101)            # 100 firing concepts with 1..100 fires, 100 dead
    fires[1] = 5                                      # every concept fires equally often
    st = stats_from_fires(fires)
    median = st.median_fires()
    assert median[0] == torch.tensor(range(1, 101), dtype=torch.float64).median() and median[1] == 5
    share = st.top_share(0.01)                        # 2 of 200 concepts
    assert math.isclose(share[0].item(), (100 + 99) / 5050) and math.isclose(share[1].item(), 0.01)
    with pytest.raises(ValueError, match="fraction = 0"):
        st.top_share(0)


def test_a_source_that_asks_for_no_progress_gets_no_bar(capsys):
    class Quiet(dict):
        progress = False

    model = UniversalSAE({"a": 4, "b": 6}, 16, 2)
    rows = Quiet(a=torch.randn(64, 4), b=torch.randn(64, 6))
    firing_stats(model, rows, batch_size=16)
    assert "firing stats" not in capsys.readouterr().err
    firing_stats(model, dict(rows), batch_size=16)  # plain rows: a bar, as before
    assert "firing stats" in capsys.readouterr().err
