"""SparseCode, TopK encoding and the sparse decode Function against dense references."""

import pytest
import torch

from usae.core.sparse import (
    SparseCode,
    available_backends,
    dense_decode_reference,
    register_backend,
    sparse_decode,
    topk_encode,
)


def random_code(n, k, m, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    values = torch.rand(n, k, generator=g, dtype=dtype) + 0.1
    return SparseCode(values, indices, m)


def test_to_dense_places_values():
    code = SparseCode(torch.tensor([[2.0, 3.0]]), torch.tensor([[4, 1]]), 5)
    assert torch.equal(code.to_dense(), torch.tensor([[0.0, 3.0, 0.0, 0.0, 2.0]]))
    assert code.k == 2 and len(code) == 1


def test_sparse_code_rejects_bad_input():
    with pytest.raises(ValueError, match="int64"):
        SparseCode(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        SparseCode(torch.rand(2, 3), torch.zeros(2, 4, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="n_latents"):
        SparseCode(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.int64), 2)


def test_topk_encode_matches_official_scatter_of_relu_topk():
    torch.manual_seed(0)
    pre = torch.randn(50, 40)
    pre[:5, :] = -1.0 - torch.rand(5, 40)  # rows with no positive entry
    code = topk_encode(pre, 6)
    relu = pre.relu()
    top = relu.topk(6, dim=1)
    official = torch.zeros_like(relu).scatter(1, top.indices, top.values)
    assert torch.equal(code.to_dense(), official)
    assert code.indices.dtype == torch.int64 and code.values.shape == (50, 6)
    with pytest.raises(ValueError, match="k = 41"):
        topk_encode(pre, 41)


def test_topk_encode_gradient_only_on_selected_positive_entries():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-2.0, -3.0, 1.0, -0.5]], requires_grad=True)
    code = topk_encode(pre, 2)
    code.values.sum().backward()
    assert torch.equal(pre.grad, torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("n,k,m,d", [(7, 3, 11, 5), (1, 1, 4, 3), (9, 4, 4, 6)])
def test_gradcheck_float64(n, k, m, d):
    code = random_code(n, k, m, torch.float64, seed=n)
    values = code.values.clone().requires_grad_()
    weight = torch.randn(m, d, dtype=torch.float64, requires_grad=True)

    def decode(v, w):
        return sparse_decode(SparseCode(v, code.indices, m), w, backend="torch")

    assert torch.autograd.gradcheck(decode, (values, weight))


def test_repeated_indices_sum_like_the_dense_reference():
    code = SparseCode(torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64), torch.tensor([[3, 3, 0]]), 5)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = sparse_decode(code, weight)
    torch.testing.assert_close(out, dense_decode_reference(code, weight))
    out.sum().backward()
    expected = torch.zeros(5, 4, dtype=torch.float64)
    expected[3] = 3.0
    expected[0] = 0.5
    torch.testing.assert_close(weight.grad, expected)


def test_realistic_shape_matches_dense_values_and_gradients():
    n, k, m, d = 512, 32, 2048, 96
    code = random_code(n, k, m, seed=3)
    grad_out = torch.randn(n, d)
    results = []
    for fn in (lambda c, w: sparse_decode(c, w, "torch"), dense_decode_reference):
        values = code.values.clone().requires_grad_()
        weight = torch.randn(m, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = fn(SparseCode(values, code.indices, m), weight)
        out.backward(grad_out)
        results.append((out.detach(), values.grad, weight.grad))
    for fast, ref in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_several_decoders_share_one_index_plan():
    code = random_code(20, 4, 30, seed=5)
    values = code.values.clone().requires_grad_()
    shared = SparseCode(values, code.indices, 30)
    weights = [torch.randn(30, d, requires_grad=True) for d in (6, 9, 3)]
    total = sum(sparse_decode(shared, w).square().sum() for w in weights)
    total.backward()
    assert sorted(shared._plans) == ["groups", "torch"]  # built once, reused by the three backward passes
    ref_values = code.values.clone().requires_grad_()
    ref_weights = [w.detach().clone().requires_grad_() for w in weights]
    dense = SparseCode(ref_values, code.indices, 30)
    sum(dense_decode_reference(dense, w).square().sum() for w in ref_weights).backward()
    torch.testing.assert_close(values.grad, ref_values.grad)
    for w, r in zip(weights, ref_weights, strict=True):
        torch.testing.assert_close(w.grad, r.grad)


def test_weight_gradient_touches_only_used_rows():
    code = SparseCode(torch.ones(3, 2), torch.tensor([[0, 2], [2, 5], [0, 5]]), 8)
    weight = torch.randn(8, 4, requires_grad=True)
    sparse_decode(code, weight).sum().backward()
    used = weight.grad.abs().sum(1) > 0
    assert used.tolist() == [True, False, True, False, False, True, False, False]


def test_backend_dispatch_and_errors():
    assert "torch" in available_backends()
    code = random_code(4, 2, 6)
    with pytest.raises(ValueError, match="backend = 'nope'"):
        sparse_decode(code, torch.randn(6, 3), backend="nope")
    with pytest.raises(ValueError, match="n_latents=6"):
        sparse_decode(code, torch.randn(5, 3))
    with pytest.raises(ValueError, match="'auto'"):
        register_backend("auto", object())


def test_registered_backend_is_used():
    calls = []
    base = available_backends()

    class Recording:
        def __init__(self):
            from usae.core.sparse import TorchBackend
            self.inner = TorchBackend()

        def forward(self, values, indices, weight):
            calls.append("forward")
            return self.inner.forward(values, indices, weight)

        def plan(self, indices, n_latents):
            calls.append("plan")
            return self.inner.plan(indices, n_latents)

        def grad_values(self, plan, grad_out, weight):
            return self.inner.grad_values(plan, grad_out, weight)

        def grad_weight(self, plan, values, grad_out):
            return self.inner.grad_weight(plan, values, grad_out)

    register_backend("recording", Recording())
    try:
        weight = torch.randn(6, 3, requires_grad=True)
        sparse_decode(random_code(4, 2, 6), weight, backend="recording").sum().backward()
        assert calls == ["forward", "plan"]
    finally:
        from usae.core import sparse
        sparse._BACKENDS.pop("recording")
    assert available_backends() == base
