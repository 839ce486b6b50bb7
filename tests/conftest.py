"""Fixtures shared by the unit tests."""

import math

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny ops run much faster single-threaded on a shared 2-core machine; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _planted_gt(seed: int = 0):
    """Random AUROC tables for 3 models, 12 concepts and factors a (3 values), b (2), c (4; value 3 absent)."""
    from usae.stats.groundtruth import GroundTruthStats

    g = torch.Generator().manual_seed(seed)
    auroc = {f: 0.5 + 0.5 * torch.rand(3, 12, v, generator=g).double() for f, v in (("a", 3), ("b", 2), ("c", 4))}
    auroc["c"][:, :, 3] = math.nan
    n_pos = {"a": torch.tensor([5, 5, 5]), "b": torch.tensor([4, 4]), "c": torch.tensor([3, 3, 3, 0])}
    return GroundTruthStats(("x", "y", "z"), 100, auroc, n_pos, {"a": ("a0", "a1", "a2")})


@pytest.fixture
def planted_gt():
    """``planted_gt(seed)``: a ``GroundTruthStats`` of random AUROC tables (models x, y, z; 12 concepts)."""
    return _planted_gt
