"""Losses against brute-force references written from their definitions."""

import pytest
import torch

from usae.core.losses import auxk_aux, keep_top_per_row, official_aux, reconstruction_error
from usae.core.model import normalise_rows
from usae.core.sparse import dense_decode_reference, topk_encode


def test_reconstruction_error_kinds():
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]])
    assert reconstruction_error(a, b, "l1").item() == pytest.approx(2.0)
    assert reconstruction_error(a, b, "l2").item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="loss kind = 'l3'"):
        reconstruction_error(a, b, "l3")


def test_keep_top_per_row_equals_scatter_of_topk():
    torch.manual_seed(0)
    u = torch.randn(40, 30).relu()
    u[:10] = torch.rand(10, 30) + 0.01  # rows with more positives than kept
    kept = keep_top_per_row(u, 7)
    top = u.topk(7, dim=1)
    assert torch.equal(kept, torch.zeros_like(u).scatter(1, top.indices, top.values))
    assert keep_top_per_row(torch.zeros(3, 5), 2).abs().sum() == 0


def _setup(seed=0, n=24, m=20, k=3, dims=(5, 8)):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, m, generator=g, dtype=torch.float64, requires_grad=True)
    raws = [torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True) for d in dims]
    targets = {f"t{j}": torch.randn(n, d, generator=g, dtype=torch.float64) for j, d in enumerate(dims)}
    return pre, raws, targets, k


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_official_aux_matches_dense_reference(kind):
    results = []
    for use_reference in (False, True):
        pre, raws, targets, k = _setup()
        dicts = {name: normalise_rows(r) for name, r in zip(targets, raws, strict=True)}
        code = topk_encode(pre, k)
        recon = {n: dense_decode_reference(code, d) for n, d in dicts.items()}
        if use_reference:  # the official formula, dense
            z = code.to_dense()
            u = pre.relu() - z
            top = u.topk(pre.shape[1] // 2, dim=1)
            u_kept = torch.zeros_like(u).scatter(1, top.indices, top.values)
            aux = {}
            for n, d in dicts.items():
                diff = (targets[n] - recon[n]) - u_kept @ d
                aux[n] = diff.abs().mean() if kind == "l1" else diff.square().mean()
        else:
            aux = official_aux(targets, recon, pre, code, dicts, kind)
        total = sum(aux.values())
        total.backward()
        results.append((torch.stack(list(aux.values())).detach(), pre.grad, [r.grad for r in raws]))
    (a, ga, wa), (b, gb, wb) = results
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    for x, y in zip(wa, wb, strict=True):
        torch.testing.assert_close(x, y)


def test_official_aux_residual_is_not_detached():
    pre, raws, targets, k = _setup()
    dicts = {n: normalise_rows(r) for n, r in zip(targets, raws, strict=True)}
    code = topk_encode(pre, k)
    recon = {n: dense_decode_reference(code, d) for n, d in dicts.items()}
    aux = official_aux(targets, recon, pre, code, {"t0": dicts["t0"]})
    assert list(aux) == ["t0"]
    aux["t0"].backward()
    # the residual r = x - x̂ depends on the selected values, so the top-k pre-activations get gradient
    selected = torch.zeros_like(pre, dtype=torch.bool).scatter(1, code.indices, True) & (pre > 0)
    assert pre.grad[selected].abs().sum() > 0


def _auxk_reference(targets, recon, pre, dead, k_aux, dicts, kind):
    out = {}
    for n, d in dicts.items():
        errors = []
        for t in range(pre.shape[0]):
            candidates = [(pre[t, j], j) for j in range(pre.shape[1]) if dead[j]]
            candidates.sort(key=lambda c: -c[0].item())
            estimate = torch.zeros(d.shape[1], dtype=pre.dtype)
            for value, j in candidates[:k_aux]:
                estimate = estimate + value.relu() * d[j]
            residual = (targets[n][t] - recon[n][t]).detach()
            errors.append((residual - estimate).abs() if kind == "l1" else (residual - estimate).square())
        out[n] = torch.stack(errors).mean()
    return out


@pytest.mark.parametrize("kind,k_aux", [("l2", 4), ("l1", 4), ("l2", 50)])
def test_auxk_matches_brute_force(kind, k_aux):
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 4, 5, 9, 11, 12, 17]] = True
    results = []
    for fn in (auxk_aux, _auxk_reference):
        pre, raws, targets, k = _setup(seed=1, n=10)
        dicts = {n: normalise_rows(r) for n, r in zip(targets, raws, strict=True)}
        code = topk_encode(pre, k)
        recon = {n: dense_decode_reference(code, d) for n, d in dicts.items()}
        aux = fn(targets, recon, pre, dead, k_aux, dicts, kind)
        sum(aux.values()).backward()
        results.append((torch.stack(list(aux.values())).detach(), pre.grad, [r.grad for r in raws]))
    (a, ga, wa), (b, gb, wb) = results
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    for x, y in zip(wa, wb, strict=True):
        torch.testing.assert_close(x, y)
    assert ga[:, ~dead].abs().sum() == 0  # only dead latents are used


def test_auxk_without_dead_latents_is_zero_and_validates_mask():
    pre, raws, targets, k = _setup()
    dicts = {n: normalise_rows(r) for n, r in zip(targets, raws, strict=True)}
    code = topk_encode(pre, k)
    recon = {n: dense_decode_reference(code, d) for n, d in dicts.items()}
    aux = auxk_aux(targets, recon, pre, torch.zeros(20, dtype=torch.bool), 4, dicts)
    assert all(v.item() == 0 for v in aux.values())
    with pytest.raises(ValueError, match="dead mask"):
        auxk_aux(targets, recon, pre, torch.zeros(19, dtype=torch.bool), 4, dicts)
