"""The official USAE training step, written again as the benchmark's reference (not the library's trainer).

One ``OfficialSAE`` object per model (Linear -> BatchNorm1d -> ReLU -> TopK, the code scattered back to a dense
``[B, m]`` tensor, a raw dictionary whose rows are re-normalised on every forward), a Python loop over the
target models with a dense ``z @ D_j`` each, the official auxiliary loss (the top m/2 unselected ReLU'd
pre-activations decode the **non-detached** residual), L1 means, coefficient 0.1, one AdamW per model (wd
1e-5) of which only the selected one is zeroed and stepped, and every model's gradient clipped at 1.0.
``tests/test_bench_step.py`` checks it against ``usae.train.trainer.Trainer`` step by step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AUX_COEF = 0.1

class OfficialSAE(nn.Module):
    """One model's SAE as in the official code: ``linear`` [m, d] + ``bn`` encoder, raw ``dictionary`` [m, d]."""

    def __init__(self, dim: int, n_latents: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.linear = nn.Linear(dim, n_latents)
        self.bn = nn.BatchNorm1d(n_latents)
        self.dictionary = nn.Parameter(torch.randn(n_latents, dim))

    def get_dictionary(self) -> Tensor:
        """[m, d] with unit-L2 rows (eps 1e-8), recomputed on every call."""
        return self.dictionary / (self.dictionary.norm(dim=1, keepdim=True) + 1e-8)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, d] -> (pre_codes [B, m] after BN, dense codes [B, m] with the top k of ReLU(pre) kept)."""
        pre = self.bn(self.linear(x))
        codes = F.relu(pre)
        top = codes.topk(self.k, dim=-1)
        return pre, torch.zeros_like(codes).scatter(-1, top.indices, top.values)

    def decode(self, codes: Tensor) -> Tensor:
        """Dense codes [B, m] -> [B, d]."""
        return codes @ self.get_dictionary()


def official_loss(x: Tensor, x_hat: Tensor, pre: Tensor, codes: Tensor, dictionary: Tensor,
                  aux: bool = True) -> Tensor:
    """The official L1 loss of one target: mean|x - x̂| (+ 0.1 x the auxiliary term when ``aux``).

    The auxiliary term keeps the top m/2 of ``ReLU(pre) - codes`` per token and asks them to decode the
    residual ``x - x̂`` (not detached). x, x_hat: [B, d]; pre, codes: [B, m]; dictionary: [m, d].
    """
    residual = x - x_hat
    loss = residual.abs().mean()
    if aux:
        unselected = F.relu(pre) - codes
        top = unselected.topk(unselected.shape[1] // 2, dim=1)
        kept = torch.zeros_like(codes).scatter(-1, top.indices, top.values)
        loss = loss + AUX_COEF * (residual - kept @ dictionary).abs().mean()
    return loss


class OfficialReference:
    """The official USAE training step over M ``OfficialSAE`` objects with one AdamW each."""

    def __init__(self, dims: Mapping[str, int], n_latents: int, k: int, *, aux: bool = True, lr: float = 3e-4,
                 weight_decay: float = 1e-5, grad_clip: float = 1.0, device: str | torch.device = "cpu") -> None:
        self.names = tuple(dims)
        self.aux, self.grad_clip = aux, grad_clip
        self.saes = nn.ModuleList(OfficialSAE(d, n_latents, k) for d in dims.values()).to(device)
        self.optimisers = [torch.optim.AdamW(s.parameters(), lr=lr, weight_decay=weight_decay) for s in self.saes]

    @classmethod
    def from_usae(cls, model: Any, **kwargs: Any) -> OfficialReference:
        """A reference holding a copy of a ``UniversalSAE``'s weights and BN state (batchnorm encoder only)."""
        if model.encoder_kind != "batchnorm":
            raise ValueError(f"OfficialReference needs a batchnorm encoder, got {model.encoder_kind!r}")
        device = next(model.parameters()).device
        ref = cls(model.dims, model.n_latents, model.k, device=device, **kwargs)
        with torch.no_grad():
            for j in range(len(ref.names)):
                ref.saes[j].load_state_dict(ref._usae_state(model.state_dict(), j))
        return ref

    @staticmethod
    def _usae_state(state: Mapping[str, Tensor], j: int) -> dict[str, Tensor]:
        prefix = f"coders.{j}."
        return {key[len(prefix):]: v.clone() for key, v in state.items()
                if key.startswith(prefix) and "standard_" not in key}

    def state_dict(self) -> dict[str, Tensor]:
        """The weights under ``UniversalSAE`` state-dict keys (``coders.{j}.linear.weight`` ...)."""
        return {f"coders.{j}.{key}": v for j, sae in enumerate(self.saes) for key, v in sae.state_dict().items()}

    def step(self, batch: Mapping[str, Tensor], i: int, lr: float | None = None) -> float:
        """One official update with model ``i`` selected; batch {name: [B, d]}. Returns the loss."""
        sae, opt = self.saes[i], self.optimisers[i]
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        opt.zero_grad()
        sae.train()
        pre, codes = sae.encode(batch[self.names[i]])
        loss = 0.0
        for j, name in enumerate(self.names):  # every decoder is in the graph and receives a gradient
            target = self.saes[j]
            loss = loss + official_loss(batch[name], target.decode(codes), pre, codes, target.get_dictionary(),
                                        self.aux)
        loss.backward()
        for s in self.saes:  # the official code clips every model, stale gradients included
            torch.nn.utils.clip_grad_norm_(s.parameters(), self.grad_clip)
        opt.step()
        return float(loss.detach())
