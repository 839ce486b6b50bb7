"""usae.stats.consistency: cosine matrix, Hungarian matching, AUC, random baseline, subsets."""

import itertools

import pytest
import torch

from usae.stats.consistency import Matching, consistency, cosine_matrix, hungarian_match, random_dictionary


def dictionary(m: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed))


def test_cosine_matrix_matches_brute_force():
    a, b = dictionary(5, 7, 0), dictionary(4, 7, 1) * 3.0
    sim = cosine_matrix(a, b)
    for i, j in itertools.product(range(5), range(4)):
        ref = torch.dot(a[i], b[j]) / (a[i].norm() * b[j].norm())
        assert sim[i, j].item() == pytest.approx(ref.item(), abs=1e-6)
    with pytest.raises(ValueError, match="widths"):
        cosine_matrix(a, dictionary(4, 6, 1))
    with pytest.raises(ValueError, match="n_atoms, d"):
        cosine_matrix(torch.zeros(5), b)


def test_hungarian_recovers_a_permuted_copy():
    a = dictionary(40, 16, 2)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    b = a[perm] * torch.rand(40, 1, generator=torch.Generator().manual_seed(4)).add(0.5)  # rescaled rows
    match = hungarian_match(a, b)
    assert len(match) == 40 and torch.equal(match.rows, torch.arange(40))
    assert torch.equal(perm[match.cols], match.rows)  # b[col] is a copy of a[row]
    assert torch.allclose(match.similarity, torch.ones(40, dtype=torch.float64))
    assert match.fraction_above(0.5) == 1.0 and match.auc == pytest.approx(1.0) and match.mean == pytest.approx(1.0)


def test_hungarian_is_optimal_on_small_case():
    a, b = dictionary(5, 3, 5), dictionary(5, 3, 6)
    sim = cosine_matrix(a, b)
    best = max(sum(sim[i, p[i]].item() for i in range(5)) for p in itertools.permutations(range(5)))
    assert hungarian_match(a, b).similarity.sum().item() == pytest.approx(best)
    rect = hungarian_match(a[:3], b)  # fewer rows than columns: every row matched once
    assert len(rect) == 3 and len(set(rect.cols.tolist())) == 3


def test_auc_equals_area_under_the_curve():
    m = Matching(torch.arange(6), torch.arange(6), torch.tensor([-0.2, 0.1, 0.3, 0.55, 0.9, 1.0], dtype=torch.float64))
    t, frac = m.curve(n_points=20001)
    area = torch.trapezoid(frac, t).item()
    assert m.auc == pytest.approx(area, abs=1e-3)
    assert m.auc == pytest.approx((0 + 0.1 + 0.3 + 0.55 + 0.9 + 1.0) / 6)
    assert m.fraction_above(0.5) == pytest.approx(3 / 6)
    assert m.summary()["n"] == 6


def test_random_baseline_is_seeded_and_well_below():
    sae = dictionary(64, 128, 7)
    usae = sae + 0.3 * dictionary(64, 128, 8)  # a noisy copy of the independent dictionary
    r1, r2 = random_dictionary(sae, seed=1), random_dictionary(sae, seed=1)
    assert torch.equal(r1, r2) and not torch.equal(r1, random_dictionary(sae, seed=2))
    assert r1.shape == (64, 128)
    per_dim = random_dictionary(sae + 5.0, n_atoms=5000, stats="per_dim", seed=0)
    assert torch.allclose(per_dim.mean(0), (sae + 5.0).mean(0).float(), atol=0.1)
    report = consistency(usae, sae, seed=0)
    assert report.matching.auc > 0.9 and report.matching.fraction_above(0.5) == 1.0
    assert report.baseline.auc < 0.5 * report.matching.auc and report.baseline.fraction_above(0.5) == 0.0
    with pytest.raises(ValueError, match="stats"):
        random_dictionary(sae, stats="global")


def test_subset_with_and_without_rematch():
    sae = dictionary(30, 12, 9)
    usae = torch.cat([sae[:10] + 0.05 * dictionary(10, 12, 10), dictionary(20, 12, 11)])
    ids = torch.tensor([4, 0, 7])
    fixed = consistency(usae, sae, subset=ids, rematch=False)
    assert fixed.subset.rows.tolist() == [4, 0, 7]
    full = fixed.matching
    for r, c, s in zip(fixed.subset.rows, fixed.subset.cols, fixed.subset.similarity, strict=True):
        j = full.rows.tolist().index(int(r))
        assert int(full.cols[j]) == int(c) and float(full.similarity[j]) == float(s)
    again = consistency(usae, sae, subset=ids, rematch=True)
    assert sorted(again.subset.rows.tolist()) == [0, 4, 7]
    assert again.subset.mean >= fixed.subset.mean - 1e-12  # matching only the subset can only do better
    assert again.subset.cols.tolist() == again.subset.rows.tolist() and again.summary()["subset"]["n"] == 3
    with pytest.raises(ValueError, match="subset"):
        consistency(usae, sae, subset=torch.tensor([30]))
