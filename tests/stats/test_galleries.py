"""Top-image selection for galleries: the streaming pass against a dense brute-force recomputation."""

import numpy as np
import pytest
import torch

from usae.core.model import UniversalSAE
from usae.core.sparse import SparseCode
from usae.stats.galleries import (
    POOLINGS,
    TopImages,
    concept_heatmaps,
    concept_values,
    most_universal,
    pool_heatmaps,
    showcase_concepts,
    top_images,
)

GRID = 3
T = GRID * GRID


def _setup(n_images: int = 23, seed: int = 0):
    torch.manual_seed(seed)
    dims = {"a": 6, "b": 5, "c": 7}
    model = UniversalSAE(dims, n_latents=12, k=4).eval()
    acts = {n: torch.randn(n_images * T, d) for n, d in dims.items()}
    return model, acts


def _brute_force(model, acts, concepts, n_top, pooling, quantile=0.9):
    """Dense codes [N, m] of every model, averaged, reshaped per image, pooled; ties by lower image index."""
    with torch.no_grad():
        dense = [model.encode(n, acts[n]).to_dense() for n in model.names]
    avg = sum(dense) / len(dense)
    maps = avg[:, concepts].reshape(-1, T, len(concepts)).permute(2, 0, 1)
    if pooling == "mean":
        scores = maps.mean(-1)
    elif pooling == "max":
        scores = maps.max(-1).values
    else:
        scores = torch.tensor(np.quantile(maps.numpy(), quantile, axis=-1))
    scores = scores.numpy()
    order = np.stack([np.lexsort((np.arange(s.shape[0]), -s))[:n_top] for s in scores])
    return order, np.take_along_axis(scores, order, 1), dense


@pytest.mark.parametrize("pooling", POOLINGS)
def test_top_images_match_brute_force(pooling):
    model, acts = _setup()
    concepts = [0, 3, 7, 11, 5]
    top = top_images(model, acts, concepts, n_top=6, pooling=pooling, quantile=0.75, grid=GRID,
                     images_per_batch=4, progress=False)
    want_i, want_s, _ = _brute_force(model, acts, concepts, 6, pooling, 0.75)
    assert isinstance(top, TopImages) and top.images.shape == (5, 6)
    np.testing.assert_allclose(top.scores.numpy(), want_s, rtol=1e-5, atol=1e-6)
    # images agree except where two scores tie to float precision
    for c in range(len(concepts)):
        for j in range(6):
            if top.images[c, j] != want_i[c, j]:
                assert abs(float(top.scores[c, j]) - want_s[c, j]) < 1e-6


def test_batching_does_not_change_the_result_and_ties_go_to_lower_index():
    model, acts = _setup(n_images=17)
    a = top_images(model, acts, [1, 2], n_top=17, grid=GRID, images_per_batch=1, progress=False)
    b = top_images(model, acts, [1, 2], n_top=17, grid=GRID, images_per_batch=100, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.scores, b.scores)
    for row_s, row_i in zip(a.scores, a.images, strict=True):          # equal scores (e.g. zeros) appear in index order
        for j in range(len(row_s) - 1):
            if row_s[j] == row_s[j + 1]:
                assert row_i[j] < row_i[j + 1]


def test_fewer_images_than_n_top_are_padded():
    model, acts = _setup(n_images=3)
    top = top_images(model, acts, [0], n_top=5, grid=GRID, progress=False)
    assert top.images[0, 3:].tolist() == [-1, -1] and torch.isinf(top.scores[0, 3:]).all()
    imgs, scores = top.of(0)
    assert len(imgs) == 3 and sorted(imgs.tolist()) == [0, 1, 2]


def test_concept_heatmaps_are_the_dense_code_values():
    model, acts = _setup(n_images=8)
    images, concepts = [5, 0, 2], [4, 9]
    maps = concept_heatmaps(model, acts, images, concepts, grid=GRID)
    assert set(maps) == set(model.names)
    for name in model.names:
        with torch.no_grad():
            dense = model.encode(name, acts[name]).to_dense().reshape(8, GRID, GRID, -1)
        assert maps[name].shape == (2, 3, GRID, GRID)
        for ci, c in enumerate(concepts):
            torch.testing.assert_close(maps[name][ci], dense[images][..., c])


def test_concept_values_gathers_from_sparse_codes():
    code = SparseCode(torch.tensor([[0.5, 2.0], [1.0, 0.0]]), torch.tensor([[3, 1], [0, 3]]), 5)
    got = concept_values(code, torch.tensor([3, 2, 0]))
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 1.0]]))


def test_bad_inputs_raise():
    model, acts = _setup(n_images=2)
    with pytest.raises(ValueError, match="pooling"):
        top_images(model, acts, [0], pooling="median", grid=GRID, progress=False)
    with pytest.raises(ValueError, match="concepts"):
        top_images(model, acts, [12], grid=GRID, progress=False)
    with pytest.raises(ValueError, match="grid"):
        top_images(model, acts, [0], progress=False)
    with pytest.raises(ValueError, match="quantile"):
        pool_heatmaps(torch.zeros(2, 3), "quantile", 1.5)
    with pytest.raises(ValueError, match="past the end"):
        concept_heatmaps(model, acts, [2], [0], grid=GRID)


def _stats():
    from usae.stats.firing import FiringStats

    fires = torch.tensor([[10, 10, 10, 10, 0, 10, 0, 9],
                          [10, 10, 10, 0, 0, 10, 0, 0],
                          [10, 10, 10, 0, 0, 0, 0, 0]])
    cof = torch.tensor([9, 2, 5, 0, 0, 0, 0, 0])
    act = fires.double() * torch.arange(1, 9).double()        # energy grows with the concept id
    return FiringStats(("a", "b", "c"), 0.1, 100, fires, cof, act, fires.clone(), torch.ones(3, 8).double())


def test_most_universal_ranks_high_entropy_concepts_by_worst_model_cofiring():
    assert most_universal(_stats(), n=5) == [0, 2, 1]


def test_showcase_groups():
    show = showcase_concepts(_stats(), n_per_group=2)
    assert show["most universal"] == [0, 2]
    assert show["pairwise a+b"] == [5]
    assert show["unique to a"] == [7, 3]                     # by energy, descending
    assert not any(k.startswith("unique to b") for k in show)
