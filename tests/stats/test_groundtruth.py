"""usae.stats.groundtruth: exact sparse AUROC against brute-force pairwise counts, planted concepts, recovery."""

import math

import numpy as np
import pytest
import torch

from usae.core.model import UniversalSAE
from usae.core.sparse import SparseCode
from usae.stats.groundtruth import GroundTruthAccumulator, GroundTruthStats, auroc_from_sparse, ground_truth_stats


def brute_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), by counting every pair."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))


def random_code(n: int, m: int, k: int, seed: int) -> SparseCode:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, m, generator=g).topk(k, dim=1).indices
    levels = torch.tensor([0.0, 0.3, 0.3, 1.0, 2.0])  # zeros in the code and many ties
    vals = torch.where(torch.rand(n, k, generator=g) < 0.5, levels[torch.randint(5, (n, k), generator=g)],
                       torch.rand(n, k, generator=g))
    return SparseCode(vals.float(), idx, m)


def test_auroc_matches_pairwise_counts_with_ties():
    n, m, k, v = 90, 7, 3, 4
    code = random_code(n, m, k, 0)
    labels = torch.randint(-1, v, (n,), generator=torch.Generator().manual_seed(1))
    labels[labels == 2] = 1  # value 2 has no positives -> NaN
    dense = code.to_dense().numpy()
    row, col = torch.nonzero(code.values > 0, as_tuple=True)
    got = auroc_from_sparse(row, code.indices[row, col], code.values[row, col], labels, m, v)
    assert got.shape == (m, v)
    for c in range(m):
        for val in range(v):
            ref = brute_auroc(dense[:, c], labels.numpy() == val)
            if math.isnan(ref):
                assert math.isnan(got[c, val])
            else:
                assert got[c, val].item() == pytest.approx(ref, abs=1e-12), (c, val)


def test_planted_concepts_and_recovery():
    n, m = 120, 6
    g = torch.Generator().manual_seed(2)
    shape = torch.randint(-1, 3, (n,), generator=g)
    color = torch.randint(0, 2, (n,), generator=g)
    codes = {}
    for name, noisy in (("x", False), ("y", True)):
        vals = torch.stack([(shape == 0).float() * 1.5, (color == 1).float(), torch.rand(n, generator=g)], 1)
        if noisy:  # in model y concept 1 is only a coin flip
            vals[:, 1] = (torch.rand(n, generator=g) < 0.5).float()
        codes[name] = SparseCode(vals, torch.tensor([[0, 1, 5]] * n), m)
    acc = GroundTruthAccumulator(("x", "y"), m)
    acc.update({k: SparseCode(c.values[:50], c.indices[:50], m) for k, c in codes.items()})
    acc.update({k: SparseCode(c.values[50:], c.indices[50:], m) for k, c in codes.items()})
    gt = acc.result({"shape": shape.numpy(), "color": color.numpy()},
                    value_names={"shape": ("o", "s", "t", "unused"), "color": ("r", "g")})
    assert gt.auroc["shape"].shape == (2, m, 4) and math.isnan(gt.auroc["shape"][0, 0, 3])
    assert gt.auroc["shape"][:, 0, 0].tolist() == [1.0, 1.0]
    assert gt.auroc["color"][0, 1, 1].item() == 1.0 and gt.auroc["color"][1, 1, 1].item() < 0.8
    assert torch.all(gt.auroc["shape"][:, 3, :3] == 0.5)  # a concept never in the code ties everywhere
    ids, au = gt.best_concept_per_value("shape")
    assert ids[0].item() == 0 and au[0].item() == 1.0 and ids[3].item() == -1 and math.isnan(au[3])
    assert gt.best_concept_per_value("color", model="x")[0][1].item() == 1
    rec = gt.recovered(0.95)
    assert rec["shape"].tolist()[0] and not rec["color"][1]  # colour 1 is not universal (coin flip in y)
    assert not gt.recovered(0.95, concepts=torch.tensor([5]))["shape"][0]
    assert gt.n_recovered(0.95) == (int(rec["shape"].sum() + rec["color"].sum()), 3 + 2)
    f, v, a = gt.best_value_per_concept(model="x")
    assert gt.factors[f[0]] == "shape" and v[0] == 0 and a[0] == 1.0
    assert gt.factors[f[1]] == "color" and v[1] == 1
    assert gt.n_positive["shape"].tolist() == [int((shape == i).sum()) for i in range(4)]


def test_bad_labels_are_rejected():
    acc = GroundTruthAccumulator(("x",), 4)
    acc.update({"x": random_code(10, 4, 2, 3)})
    with pytest.raises(ValueError, match="one per token"):
        acc.result({"shape": np.zeros(9, dtype=np.int64)})
    with pytest.raises(ValueError, match="integer"):
        acc.result({"shape": np.zeros(10)})
    with pytest.raises(ValueError, match="n_values"):
        acc.result({"shape": np.arange(10)}, n_values={"shape": 3})
    with pytest.raises(ValueError, match="-1"):
        acc.result({"shape": np.full(10, -2)})


class FakeStore:
    """The ActivationStore surface ground_truth_stats uses."""

    def __init__(self, acts, labels):
        self.acts, self._labels = acts, labels

    def n_rows(self, split):
        return len(self._labels["shape"])

    def labels(self, split):
        return self._labels

    def batches(self, split, batch_size, shuffle=True, seed=0, drop_last=True, models=None):
        assert not shuffle and not drop_last
        for s in range(0, self.n_rows(split), batch_size):
            yield {m: self.acts[m][s:s + batch_size] for m in models}


def test_ground_truth_stats_end_to_end_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = UniversalSAE({"a": 5, "b": 3}, n_latents=8, k=2)
    acts = {"a": torch.randn(45, 5), "b": torch.randn(45, 3)}
    labels = {"shape": np.random.default_rng(0).integers(-1, 3, 45)}
    gt = ground_truth_stats(model, FakeStore(acts, labels), batch_size=10, progress=False)
    model.eval()
    with torch.no_grad():
        dense = {n: model.encode(n, acts[n]).to_dense().numpy() for n in model.names}
    for i, n in enumerate(model.names):
        for c in range(8):
            for v in range(3):
                assert gt.auroc["shape"][i, c, v].item() == pytest.approx(
                    brute_auroc(dense[n][:, c], labels["shape"] == v), abs=1e-12)
    gt.save(tmp_path / "gt.safetensors")
    back = GroundTruthStats.load(tmp_path / "gt.safetensors")
    assert back.names == gt.names and back.n_tokens == 45 and back.factors == ("shape",)
    assert torch.equal(back.auroc["shape"].nan_to_num(-7), gt.auroc["shape"].nan_to_num(-7))
    with pytest.raises(ValueError, match="labels"):
        ground_truth_stats(model, acts, progress=False)

