"""usae.core.kernels against brute-force dense references: latent grouping, TopK selection, the three sparse
primitives (torch and, under TRITON_INTERPRET=1 on CPU, Triton), decoding into many dictionaries, the fused
encoder's exact backward against autograd, and the dense masked decoding of the auxiliary losses."""

import copy
import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from usae.core.kernels import reference as ref
from usae.core.kernels import torch_ops
from usae.core.kernels.dense import masked_decode
from usae.core.kernels.encoder import dense_pre, encoder_forward, encoder_topk, gather_pre
from usae.core.kernels.groups import group_by_latent
from usae.core.kernels.select import topk_indices
from usae.core.sparse import SparseCode, sparse_decode, sparse_decode_many

pytestmark = pytest.mark.usefixtures("one_thread")


def case(n=13, m=37, k=3, widths=(7, 70), seed=0, dtype=torch.float32):
    """Indices with a latent shared by every token, latents used by no token, and k distinct per row."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(m - 4, generator=g)[:k] for _ in range(n)])  # last 4 latents unused
    indices[:, 0] = 5
    indices[:, 1:] = torch.where(indices[:, 1:] == 5, m - 5, indices[:, 1:])
    values = torch.rand(n, k, generator=g, dtype=dtype) + 0.1
    tables = [torch.randn(m, d, generator=g, dtype=dtype) for d in widths]
    grads = [torch.randn(n, d, generator=g, dtype=dtype) for d in widths]
    return values, indices, tables, grads


# -- grouping and selection ------------------------------------------------------------------------------
def test_group_by_latent_lists_each_latents_entries_in_token_order():
    indices = torch.tensor([[2, 0], [2, 3], [0, 2]])
    groups = group_by_latent(indices, 5)
    assert groups.offsets.tolist() == [0, 2, 2, 5, 6, 6]  # latents 1 and 4: empty segments
    assert groups.order.tolist() == [1, 4, 0, 2, 5, 3]
    assert groups.tokens.tolist() == [0, 2, 0, 1, 2, 1]
    assert groups.gather(torch.arange(6.0).view(3, 2)).tolist() == [1.0, 4.0, 0.0, 2.0, 5.0, 3.0]
    with pytest.raises(ValueError, match="int64"):
        group_by_latent(indices.int(), 5)


@pytest.mark.parametrize("n,m,k,block", [(40, 6144, 32, 32), (20, 1000, 3, 32), (30, 130, 2, 8),
                                         (10, 4096, 1, 32), (9, 1000, 5, 4), (5, 50, 50, 32)])
def test_topk_indices_selects_the_largest_entries(n, m, k, block):
    g = torch.Generator().manual_seed(m)
    for scores in (torch.randn(n, m, generator=g), torch.randn(n, m + 3, generator=g)[:, :m]):
        scores[0] = 1.0                           # a row of ties
        scores[-1, : m // 2] = float("-inf")
        got = topk_indices(scores, k, block)
        assert got.shape == (n, k) and got.dtype == torch.int64
        assert all(len(set(row.tolist())) == k for row in got)
        expected = scores.topk(k, dim=1).values
        torch.testing.assert_close(scores.gather(1, got).sort(1).values, expected.sort(1).values)
    with pytest.raises(ValueError, match="k = 0"):
        topk_indices(torch.zeros(2, 3), 0)


def test_topk_indices_row_of_nan_falls_back_to_torch_topk():
    scores = torch.randn(4, 512)
    scores[2] = float("nan")
    got = topk_indices(scores, 3, block=32)
    assert torch.equal(got[[0, 1, 3]].sort(1).values, scores[[0, 1, 3]].topk(3, 1).indices.sort(1).values)


# -- the three primitives --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_primitives_match_dense_references(dtype):
    values, indices, tables, grads = case(dtype=dtype, widths=(7, 70, 130))
    pairs = zip(torch_ops.gather_sum(values, indices, tables), ref.gather_sum(values, indices, tables), strict=True)
    for got, want in pairs:
        torch.testing.assert_close(got, want)
    pattern = torch_ops.row_pattern(indices, 37)
    torch.testing.assert_close(torch_ops.sampled_dots(pattern, grads, tables), ref.sampled_dots(indices, grads, tables))
    groups = group_by_latent(indices, 37)
    weights = groups.gather(values)
    for w in (weights, None):
        got = torch_ops.segment_rows(groups.offsets, groups.tokens, w, grads[2])
        torch.testing.assert_close(got, ref.segment_rows(groups.offsets, groups.tokens, w, grads[2]))
    assert got[-4:].abs().sum() == 0  # latents no token uses


def test_segment_rows_is_deterministic():
    values, indices, _, grads = case(n=300, m=50, k=8, widths=(200,))
    groups = group_by_latent(indices, 50)
    runs = [torch_ops.segment_rows(groups.offsets, groups.tokens, groups.gather(values), grads[0]) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


# -- decoding into many dictionaries -------------------------------------------------------------------
def _decode_grads(fn, values, indices, tables, frozen=(1,)):
    v = values.clone().requires_grad_()
    ws = [t.clone().requires_grad_(j not in frozen) for j, t in enumerate(tables)]
    outs = fn(v, ws)
    g = torch.Generator().manual_seed(9)
    sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs).backward()
    return [o.detach() for o in outs], v.grad, [w.grad for w in ws]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_sparse_decode_many_matches_dense_and_skips_frozen(backend):
    values, indices, tables, _ = case(widths=(7, 70, 3))
    fast = _decode_grads(lambda v, ws: sparse_decode_many(SparseCode(v, indices, 37), ws, backend),
                         values, indices, tables)
    dense = _decode_grads(lambda v, ws: ref.gather_sum(v, indices, ws), values, indices, tables)
    single = _decode_grads(lambda v, ws: [sparse_decode(SparseCode(v, indices, 37), w, "torch") for w in ws],
                           values, indices, tables)
    for other in (dense, single):
        for a, b in zip(fast[0], other[0], strict=True):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(fast[1], other[1])
        for a, b in zip(fast[2], other[2], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
    assert fast[2][1] is None


def test_sparse_decode_many_gradcheck_and_errors():
    values, indices, tables, _ = case(n=5, m=9, k=2, widths=(3, 4), dtype=torch.float64)
    indices = indices % 9
    ws = [t.requires_grad_() for t in tables]
    v = values.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, a, b: sparse_decode_many(SparseCode(v, indices, 9), [a, b]),
                                    (v, *ws))
    code = SparseCode(values.detach(), indices, 9)
    with pytest.raises(ValueError, match="weights is empty"):
        sparse_decode_many(code, [])
    with pytest.raises(ValueError, match=r"weights\[1\] has shape \(8, 4\)"):
        sparse_decode_many(code, [tables[0].detach(), torch.zeros(8, 4, dtype=torch.float64)])


# -- Triton kernels, interpreted on CPU -------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_kernels():
    """usae.core.kernels.triton_backend defined under TRITON_INTERPRET=1 (removed again afterwards).

    The interpreter only works when TRITON_INTERPRET is set before triton itself is imported; if something in
    this process imported triton earlier, the Triton tests run in a fresh interpreter instead.
    """
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                               "triton"], env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"Triton tests failed in a fresh interpreter:\n{done.stdout[-4000:]}")
        pytest.skip("triton was already imported here; the Triton tests passed in a fresh interpreter")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")  # before triton is first imported, and before the kernels are defined
    pytest.importorskip("triton")
    sys.modules.pop("usae.core.kernels.triton_backend", None)
    module = importlib.import_module("usae.core.kernels.triton_backend")
    yield module
    from usae.core import sparse
    sparse._BACKENDS.pop("triton", None)
    sys.modules.pop("usae.core.kernels.triton_backend", None)
    mp.undo()


@pytest.mark.parametrize("n,m,k,widths", [(9, 37, 1, (5,)), (13, 37, 3, (7, 70)), (4, 70, 6, (65,))])
def test_triton_kernels_match_references(triton_kernels, n, m, k, widths):
    values, indices, tables, grads = case(n=n, m=m, k=k, widths=widths, seed=k)
    got_sums = triton_kernels.gather_sum(values, indices, tables)
    pairs = zip(got_sums, ref.gather_sum(values, indices, tables), strict=True)
    for got, want in pairs:
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(triton_kernels.sampled_dots(indices, grads, tables),
                               ref.sampled_dots(indices, grads, tables))
    groups = group_by_latent(indices, m)
    for w in (groups.gather(values), None):
        got = triton_kernels.segment_rows(groups.offsets, groups.tokens, w, grads[-1])
        torch.testing.assert_close(got, ref.segment_rows(groups.offsets, groups.tokens, w, grads[-1]))
    assert got[-4:].abs().sum() == 0  # empty segments write zeros


def test_triton_backend_decodes_many(triton_kernels):
    values, indices, tables, _ = case(n=6, m=20, k=2, widths=(5, 3))
    indices = indices % 20
    fast = _decode_grads(lambda v, ws: sparse_decode_many(SparseCode(v, indices, 20), ws, "triton"),
                         values, indices, tables)
    dense = _decode_grads(lambda v, ws: ref.gather_sum(v, indices, ws), values, indices, tables)
    for a, b in zip(fast[0] + [fast[1], fast[2][0]], dense[0] + [dense[1], dense[2][0]], strict=True):
        torch.testing.assert_close(a, b)


# -- the fused encoder -----------------------------------------------------------------------------------
def _encoder(kind, d=7, m=30, momentum=0.1, affine=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(d, m)
    bn = None
    if kind == "batchnorm":
        bn = nn.BatchNorm1d(m, momentum=momentum, affine=affine)
        if affine:
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
    return linear, bn


def _grads(linear, bn):
    params = list(linear.parameters()) + (list(bn.parameters()) if bn is not None else [])
    return [p.grad for p in params]


@pytest.mark.parametrize("kind,momentum,affine,dense", [
    ("batchnorm", 0.1, True, False), ("batchnorm", None, True, False), ("batchnorm", 0.1, False, False),
    ("linear", 0.1, True, False), ("batchnorm", 0.1, True, True), ("linear", 0.1, True, True)])
def test_fused_encoder_matches_autograd(kind, momentum, affine, dense):
    linear, bn = _encoder(kind, momentum=momentum, affine=affine)
    linear_ref, bn_ref = copy.deepcopy(linear), copy.deepcopy(bn)
    g = torch.Generator().manual_seed(1)
    for step in range(2):  # two steps: running statistics (and the cumulative average) compound
        x = torch.randn(40, 7, generator=g) * 2 + 0.5
        pre_ref = ref.encoder_pre(linear_ref, bn_ref, x)
        idx = pre_ref.detach().topk(5, dim=1).indices
        idx = torch.cat([idx, idx[:, :2], torch.randint(0, 30, (40, 3), generator=g)], 1)  # repeats, extras
        upstream = torch.randn(40, 30 if dense else idx.shape[1], generator=g)
        (pre_ref if dense else pre_ref.gather(1, idx)).mul(upstream).sum().backward()
        enc = encoder_forward(linear, bn, x)
        torch.testing.assert_close(enc.pre, pre_ref.detach(), rtol=1e-5, atol=1e-5)
        (dense_pre(enc) if dense else gather_pre(enc, idx)).mul(upstream).sum().backward()
        for got, want in zip(_grads(linear, bn), _grads(linear_ref, bn_ref), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if bn is not None:
            assert linear.bias.grad.abs().max() == 0  # exactly zero: BN removes the bias
            torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
            torch.testing.assert_close(bn.running_var, bn_ref.running_var)
            assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked) == step + 1


def test_fused_encoder_exact_where_gamma_is_zero():
    linear, bn = _encoder("batchnorm")
    with torch.no_grad():
        bn.weight[:4] = 0.0
        bn.bias[4:8] = 50.0
    linear_ref, bn_ref = copy.deepcopy(linear), copy.deepcopy(bn)
    x = torch.randn(32, 7)
    idx = torch.arange(10).expand(32, 10)
    ref.encoder_pre(linear_ref, bn_ref, x).gather(1, idx).sum().backward()
    gather_pre(encoder_forward(linear, bn, x), idx).sum().backward()
    for got, want in zip(_grads(linear, bn), _grads(linear_ref, bn_ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fused_encoder_rejects_bad_use():
    linear, bn = _encoder("batchnorm")
    with pytest.raises(ValueError, match=r"expected \[N, 7\]"):
        encoder_forward(linear, bn, torch.randn(4, 6))
    with pytest.raises(ValueError, match="bf16=True is only supported on CUDA"):
        encoder_forward(linear, bn, torch.randn(4, 7), bf16=True)
    with pytest.raises(ValueError, match="at least 2"):
        encoder_forward(linear, bn, torch.randn(1, 7))
    enc = encoder_forward(linear, bn, torch.randn(4, 7))
    with pytest.raises(ValueError, match="gather_pre: indices"):
        gather_pre(enc, torch.zeros(3, 2, dtype=torch.int64))
    bn.eval()
    with pytest.raises(ValueError, match="eval mode"):
        encoder_forward(linear, bn, torch.randn(4, 7))


# -- dense masked decoding (the auxiliary losses) ----------------------------------------------------------
def test_masked_decode_matches_autograd_and_skips_frozen():
    g = torch.Generator().manual_seed(4)
    pre = torch.randn(12, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(12, 9, generator=g) > 0.5
    weights = [torch.randn(9, d, generator=g, dtype=torch.float64) for d in (3, 5)]
    upstream = torch.randn(12, 8, generator=g, dtype=torch.float64)
    results = []
    for fast in (True, False):
        p = pre.clone().requires_grad_()
        ws = [weights[0].clone().requires_grad_(), weights[1].clone()]  # the second one is frozen
        out = masked_decode(p, mask, ws) if fast else torch.where(mask, p, 0.0) @ torch.cat(ws, 1)
        (out * upstream).sum().backward()
        results.append((out.detach(), p.grad, ws[0].grad, ws[1].grad))
    for a, b in zip(*results, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"weights\[0\] has shape"):
        masked_decode(pre, mask, [torch.zeros(8, 2, dtype=torch.float64)])


# -- reused scratch tensors ---------------------------------------------------------------------------------
def test_scratch_reuses_one_growing_buffer_per_key_and_row_dots_is_exact():
    from usae.core.kernels.scratch import clear_scratch, row_dots, scratch

    clear_scratch()
    like = torch.zeros(1)
    big = scratch("t", (6, 5), like)
    small = scratch("t", (2, 3), like)  # a smaller shape is a view of the same storage
    assert small.data_ptr() == big.data_ptr() and small.shape == (2, 3)
    assert scratch("t", (6, 5), like).data_ptr() == big.data_ptr()
    assert scratch("u", (2, 3), like).data_ptr() != big.data_ptr()  # keys do not share
    assert scratch("t", (2, 3), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    a, b = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(row_dots(a, b), (a * b).sum(1))
    clear_scratch()


# -- the blocked encoder + TopK ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["batchnorm", "linear"])
def test_blocked_encoder_topk_matches_the_full_pass(kind):
    linear, bn = _encoder(kind, d=7, m=30)
    twin = copy.deepcopy((linear, bn))
    x = torch.randn(23, 7, generator=torch.Generator().manual_seed(3))
    full = encoder_forward(linear, bn, x)
    cols = torch.tensor([3, 17, 29])
    got = encoder_topk(*twin, x, 4, columns=cols, block_rows=5)  # 5 blocks, the last one short
    assert got.enc.pre is None and got.indices.shape == (23, 4)
    assert torch.equal(got.indices.sort(1).values, topk_indices(full.pre, 4).sort(1).values)
    torch.testing.assert_close(got.values, full.pre.gather(1, got.indices))
    torch.testing.assert_close(got.columns_pre, full.pre[:, cols])
    if bn is not None:  # the running statistics are updated once, alike
        torch.testing.assert_close(twin[1].running_var, bn.running_var)
    g, gc = torch.randn(23, 4), torch.randn(23, 3)
    ((gather_pre(full, got.indices) * g).sum() + (dense_pre(full, cols) * gc).sum()).backward()
    ((gather_pre(got.enc, got.indices, values=got.values) * g).sum()
     + (dense_pre(got.enc, cols, got.columns_pre) * gc).sum()).backward()
    for want, have in zip(_grads(linear, bn), _grads(*twin), strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
    every = encoder_topk(*copy.deepcopy((linear, bn)), x, 4, all_columns=True, block_rows=64)
    torch.testing.assert_close(every.columns_pre, full.pre)
    with pytest.raises(ValueError, match="kept no pre-activations"):
        gather_pre(got.enc, got.indices)
    with pytest.raises(ValueError, match="kept no pre-activations"):
        dense_pre(got.enc, cols)
    with pytest.raises(ValueError, match="block_rows = 0"):
        encoder_topk(*twin, x, 4, block_rows=0)
