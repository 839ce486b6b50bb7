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


# -- levels, the paper's bar as a detector, linear probes ----------------------------------------------------
from types import SimpleNamespace  # noqa: E402

from usae.stats.groundtruth import bar_detection, factor_recovery, level_recovery, linear_probe  # noqa: E402


def planted_gt(seed: int = 0) -> GroundTruthStats:
    """Random AUROC tables for 3 models, 12 concepts and factors a (3 values), b (2), c (4; value 3 absent)."""
    g = torch.Generator().manual_seed(seed)
    auroc = {f: 0.5 + 0.5 * torch.rand(3, 12, v, generator=g).double() for f, v in (("a", 3), ("b", 2), ("c", 4))}
    auroc["c"][:, :, 3] = math.nan
    n_pos = {"a": torch.tensor([5, 5, 5]), "b": torch.tensor([4, 4]), "c": torch.tensor([3, 3, 3, 0])}
    return GroundTruthStats(("x", "y", "z"), 100, auroc, n_pos, {"a": ("a0", "a1", "a2")})


def test_factor_and_level_recovery_match_brute_force():
    gt = planted_gt()
    design = [SimpleNamespace(factor="a", level="low", models=("x", "y", "z"), expected="universal"),
              SimpleNamespace(factor="b", level="low", models=("y",), expected="unique"),
              SimpleNamespace(factor="c", level="high", models=("x", "y", "z"), expected="universal")]
    thr = 0.8
    rows = factor_recovery(gt, design, thr)
    for d, r in zip(design, rows, strict=True):
        a = gt.auroc[d.factor].nan_to_num(-1.0)                      # [M, m, V]
        present = [v for v in range(a.shape[2]) if gt.n_positive[d.factor][v] > 0]
        assert r.values == len(present)
        assert r.universal == sum(any(all(a[i, k, v] >= thr for i in range(3)) for k in range(12)) for v in present)
        assert r.per_model == tuple(sum(any(a[i, k, v] >= thr for k in range(12)) for v in present) for i in range(3))
        outside = [c for n, c in zip(gt.names, r.per_model, strict=True) if n not in d.models]
        assert r.outside == max(outside, default=0)
        assert r.row()["design"] == d.expected and r.row()["x"] == r.per_model[0]
    levels = {lv.level: lv for lv in level_recovery(rows)}
    assert list(levels) == ["low", "high"]
    assert levels["low"].universal_factors == ("a",) and levels["low"].specific_factors == ("b",)
    assert levels["low"].universal_share == rows[0].universal / rows[0].values
    assert levels["low"].specific_outside == rows[1].outside
    assert levels["high"].universal_values == 3 and levels["high"].specific_outside == 0
    with pytest.raises(ValueError, match="'d'"):
        factor_recovery(gt, [SimpleNamespace(factor="d", level="low", models=(), expected="none")])


def test_best_universal_and_value_names():
    gt = planted_gt(1)
    v, k, auc = gt.best_universal("a")
    worst = gt.auroc["a"].min(0).values                               # [m, V]
    assert auc == pytest.approx(float(worst.max())) and float(worst[k, v]) == pytest.approx(auc)
    assert gt.value_name("a", 1) == "a1" and gt.value_name("c", 2) == "2"


def test_bar_detection_matches_brute_force():
    gt = planted_gt(2)
    g = torch.Generator().manual_seed(3)
    fires = torch.randint(0, 5, (3, 12), generator=g)
    fires[:, 0] = 0                                                    # concept 0 never fired
    stats = SimpleNamespace(never_fired=fires.sum(0) == 0, entropy=torch.rand(12, generator=g).double() * 0.3 + 0.75,
                            cofire_proportion=torch.rand(3, 12, generator=g).double())
    det = bar_detection(gt, stats, min_entropy=0.9, auroc=0.85, thresholds=torch.tensor([0.0, 0.2, 0.5, 0.9]))
    truth = [bool(~stats.never_fired[k]) and max(float(gt.auroc[f][:, k].min(0).values.nan_to_num(-1).max())
                                                 for f in gt.factors) >= 0.85 for k in range(12)]
    assert det.n_true == sum(truth)
    for i, t in enumerate([0.0, 0.2, 0.5, 0.9]):
        kept = [k for k in range(12) if not stats.never_fired[k] and stats.entropy[k] > 0.9
                and float(stats.cofire_proportion[:, k].min()) > t]
        tp = sum(truth[k] for k in kept)
        assert int(det.kept[i]) == len(kept)
        if kept:
            assert float(det.precision[i]) == pytest.approx(tp / len(kept))
        else:
            assert math.isnan(float(det.precision[i]))
        assert float(det.recall[i]) == pytest.approx(tp / det.n_true)
        assert float(det.f1[i]) == pytest.approx(2 * tp / (len(kept) + det.n_true) if tp else 0.0)
    assert det.at(0.49)[2] == int(det.kept[2])
    assert float(det.best_threshold) in (0.0, 0.2, 0.5, 0.9)


class TinyStore:
    """A store stand-in: tokens whose first coordinate encodes the label (linearly separable)."""

    def __init__(self, n: int = 400, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dims = {"x": 5}
        self._rows, self._labels = {}, {}
        for split in ("train", "val"):
            lab = torch.randint(-1, 3, (n,), generator=g)
            x = torch.randn(n, 5, generator=g) * 0.05
            x[:, :3] += torch.nn.functional.one_hot(lab.clamp(min=0), 3).float() * (lab >= 0).float()[:, None]
            self._rows[split], self._labels[split] = x, {"f": lab.numpy(), "g": np.zeros(n, dtype=np.int64)}

    def n_rows(self, split: str) -> int:
        return len(self._rows[split])

    def rows(self, split: str, model: str, start: int, stop: int) -> torch.Tensor:
        return self._rows[split][start:stop]

    def labels(self, split: str) -> dict:
        return self._labels[split]


def test_linear_probe_finds_a_planted_linear_factor():
    store = TinyStore()
    r = linear_probe(store, "x", "f", batch_size=64)                  # several batches
    val = store.labels("val")["f"]
    assert r.accuracy == 1.0 and r.n_eval == int((val >= 0).sum())
    assert r.chance == pytest.approx(np.bincount(val[val >= 0]).max() / r.n_eval)
    with pytest.raises(ValueError, match="'h'"):
        linear_probe(store, "x", "h")
    with pytest.raises(ValueError, match="fewer than two"):
        linear_probe(store, "x", "g")
