"""The Universal Sparse Autoencoder: one encoder and one decoder per model over one shared code space.

Model ``i`` (width d_i) has an encoder ``x [N, d_i] -> pre [N, m]`` (Linear -> BatchNorm1d for
``encoder="batchnorm"``, the official ``mlp_bn_1``; Linear alone for ``"linear"``), then ReLU -> TopK(k), and a
bias-free decoder whose dictionary rows are re-normalised to unit L2 norm on every forward
(``W / (||W_row|| + 1e-8)``, as the official code). A code from any encoder decodes into every model.

Training uses ``encode_train`` (the fused encoder of ``usae.core.kernels.encoder``: exact gradients without the
dense weight-gradient GEMM) or ``encode_pre_train`` (same, with a dense gradient, for the official auxiliary
loss); ``decode`` goes through ``sparse_decode_many`` (one pass, one index plan for every dictionary).

Per-model standardisation statistics (the ``(x - mean) / (std + 1e-5)`` applied before the encoder) travel
with the model: ``set_standardisation`` stores them, ``standardise`` applies them, ``save``/``load`` keep them.
Rows coming from an ``ActivationStore`` are already standardised; raw backbone tokens (e.g. CAM) are not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from usae._checks import positive_int
from usae._io import atomic_write
from usae.core.kernels.encoder import dense_pre, encoder_forward, encoder_topk, gather_pre
from usae.core.kernels.groups import group_by_latent
from usae.core.kernels.scratch import row_dots
from usae.core.kernels.select import topk_indices
from usae.core.sparse import SparseCode, sparse_decode_many, topk_encode

__all__ = ["UniversalSAE", "TrainEncoding", "ENCODERS", "INITS", "normalise_rows"]

ENCODERS = ("batchnorm", "linear")
# initial decoder rows: "tied" the encoder's rows normalised (our default, as OpenAI's and EleutherAI's TopK
# SAEs), "unit" randn rows scaled to unit norm, "official" plain randn (norm ~ sqrt(d), the authors' code)
INITS = ("tied", "unit", "official")
_FORMAT = "usae.UniversalSAE/1"
STANDARDISATION_EPS = 1e-5


class _NormaliseRows(torch.autograd.Function):
    """w / (||w|| + eps) per row: two passes forward, two backward (autograd's version takes about six)."""

    @staticmethod
    def forward(ctx, weight: Tensor, eps: float) -> Tensor:
        norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
        scale = 1.0 / (norm + eps)
        ctx.save_for_backward(weight, norm, scale)
        return weight * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        # d/dw [w s(||w||)] · g = s g − w (s² / ||w||) (w·g), s = 1/(||w|| + eps); rows with w = 0 get s g
        weight, norm, scale = ctx.saved_tensors
        coef = torch.where(norm > 0, scale.square() / norm, 0.0) * row_dots(weight, grad).unsqueeze(1)
        return (grad * scale).addcmul_(weight, coef, value=-1), None


def normalise_rows(weight: Tensor, eps: float = 1e-8) -> Tensor:
    """Unit-L2 rows: weight [m, d] -> weight / (||row|| + eps) (the official ``l2`` dictionary normalisation)."""
    return _NormaliseRows.apply(weight, eps)


class ModelCoder(nn.Module):
    """Encoder and decoder of one model: ``linear`` [m, d] (+ ``bn``), raw ``dictionary`` [m, d]."""

    def __init__(self, dim: int, n_latents: int, encoder: str, init: str = "tied") -> None:
        super().__init__()
        self.linear = nn.Linear(dim, n_latents)
        self.bn = nn.BatchNorm1d(n_latents) if encoder == "batchnorm" else None
        raw = torch.randn(n_latents, dim)  # drawn for every init: the RNG stream does not depend on it
        if init == "unit":
            raw = F.normalize(raw, dim=1)
        elif init == "tied":
            raw = F.normalize(self.linear.weight.detach().clone(), dim=1)
        self.dictionary = nn.Parameter(raw)
        self.register_buffer("standard_mean", None)
        self.register_buffer("standard_std", None)

    def pre(self, x: Tensor) -> Tensor:
        h = self.linear(x)
        return self.bn(h) if self.bn is not None else h

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.linear.parameters()) + (list(self.bn.parameters()) if self.bn is not None else [])


def _check_dims(dims: Any) -> dict[str, int]:
    if not isinstance(dims, Mapping) or not dims:
        raise ValueError(f"dims = {dims!r} is not valid; expected a non-empty mapping model name -> width")
    out = {}
    for name, dim in dims.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"dims: model name {name!r} is not valid; expected a non-empty string")
        positive_int(f"dims[{name!r}]", dim)
        out[name] = dim
    return out


class TrainEncoding(NamedTuple):
    """What ``UniversalSAE.encode_train`` returns: the TopK ``code`` and, when dead latents were asked for
    and exist, their pre-activations ``dead_pre`` [N, C] and latent ids ``dead_columns`` [C]."""

    code: SparseCode
    dead_pre: Tensor | None = None
    dead_columns: Tensor | None = None


class UniversalSAE(nn.Module):
    """M per-model TopK SAEs sharing one code space of ``n_latents`` latents (any names, any widths).

    >>> sae = UniversalSAE({"vit": 768, "dino": 384}, n_latents=6144, k=32)
    >>> code = sae.encode("vit", x)          # SparseCode, values/indices [N, 32]
    >>> recon = sae.decode(code)             # {"vit": [N, 768], "dino": [N, 384]}

    ``init`` sets the initial decoder rows (``INITS``): ``"tied"`` (default) each model's encoder rows,
    normalised; ``"unit"`` random unit-norm rows; ``"official"`` the authors' plain ``randn`` rows (norm
    about sqrt(d)), which move little at short budgets (discrepancies appendix). Only the starting point
    differs: the forward pass always normalises the rows.
    """

    def __init__(self, dims: Mapping[str, int], n_latents: int, k: int, encoder: str = "batchnorm",
                 init: str = "tied") -> None:
        super().__init__()
        dims = _check_dims(dims)
        positive_int("n_latents", n_latents)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_latents:
            raise ValueError(f"k = {k!r} is not valid; expected an integer with 1 <= k <= n_latents={n_latents}")
        if encoder not in ENCODERS:
            raise ValueError(f"encoder = {encoder!r} is not valid; expected one of {list(ENCODERS)}")
        if init not in INITS:
            raise ValueError(f"init = {init!r} is not valid; expected one of {list(INITS)}")
        self.init = init
        self.names: tuple[str, ...] = tuple(dims)
        self.dims: dict[str, int] = dims
        self.n_latents, self.k, self.encoder_kind = n_latents, k, encoder
        self._index = {name: i for i, name in enumerate(self.names)}
        self.coders = nn.ModuleList(ModelCoder(dims[n], n_latents, encoder, init) for n in self.names)

    # -- lookup ---------------------------------------------------------------------------------------------
    def index(self, name: str) -> int:
        """Position of ``name`` in ``names`` (the row/column of the R² matrix)."""
        if name not in self._index:
            raise ValueError(f"model {name!r} is not valid; expected one of {list(self.names)}")
        return self._index[name]

    def coder(self, name: str) -> ModelCoder:
        return self.coders[self.index(name)]

    def model_parameters(self, name: str) -> list[nn.Parameter]:
        """Encoder and decoder parameters of one model (what its optimizer steps)."""
        coder = self.coder(name)
        return coder.encoder_parameters() + [coder.dictionary]

    def config(self) -> dict[str, Any]:
        return {"dims": dict(self.dims), "n_latents": self.n_latents, "k": self.k, "encoder": self.encoder_kind,
                "init": self.init}

    # -- encode / decode -----------------------------------------------------------------------------------
    def check_input(self, name: str, x: Tensor) -> None:
        d = self.dims[self.names[self.index(name)]]
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != d:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"input for {name!r} has shape {shape}; expected [N, {d}]")

    def check_batch(self, batch: Any) -> dict[str, Tensor]:
        """Validate a batch of aligned rows {name: [N, d]} -> float32 tensors in ``names`` order.

        ValueError when it is not a mapping, a model is missing, widths or row counts disagree, or it holds
        NaN/Inf. Extra keys are ignored.
        """
        if not isinstance(batch, Mapping):
            raise ValueError(f"batch of type {type(batch).__name__} is not valid; expected a dict name -> [N, d]")
        missing = [n for n in self.names if n not in batch]
        if missing:
            raise ValueError(f"batch is missing model(s) {missing}; it has {list(batch)}, expected {list(self.names)}")
        out = {}
        for name in self.names:
            x = torch.as_tensor(batch[name])
            self.check_input(name, x)
            if not x.is_floating_point():
                raise ValueError(f"batch[{name!r}] has dtype {x.dtype}; expected a float dtype")
            out[name] = x.float()
        rows = {n: x.shape[0] for n, x in out.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"batch: models disagree in row count {rows}; rows must be aligned")
        bad = [n for n, x in out.items() if not torch.isfinite(x.sum()) and not torch.isfinite(x).all()]
        if bad:
            raise ValueError(f"batch contains NaN/Inf for model(s) {bad}")
        return out

    def encode_pre(self, name: str, x: Tensor) -> Tensor:
        """Pre-TopK activations of model ``name``: x [N, d] -> [N, m] (post-BN, pre-ReLU)."""
        self.check_input(name, x)
        return self.coder(name).pre(x)

    def encode(self, name: str, x: Tensor) -> SparseCode:
        """x [N, d] (standardised activations of model ``name``) -> SparseCode with k latents per token."""
        return topk_encode(self.encode_pre(name, x), self.k)

    def encode_train(self, name: str, x: Tensor, *, dead: Tensor | None = None, out: Tensor | None = None,
                     bf16: bool = False) -> TrainEncoding:
        """Training-mode encoding with the fused encoder (``usae.core.kernels.encoder``): x [N, d] -> TrainEncoding.

        The dense pre-activations are computed without autograd (BatchNorm folded into one GEMM, its running
        statistics updated); the TopK code backpropagates into the encoder through an exact sparse backward
        with no [N, m] gradient. On CPU (not bf16) the encoder and TopK run in row blocks (``encoder_topk``),
        so the [N, m] pre-activations never exist at once. With ``dead`` ([m] bool) the result also holds
        ``dead_pre = pre[:, columns]`` [N, C] and ``dead_columns`` [C] for the C dead latents (both None when
        there are none), with a dense backward restricted to those columns (for AuxK). ``out``: an [N, m]
        float32 buffer to reuse (GPU path); ``bf16``: bfloat16 encoder GEMM (CUDA only).
        """
        self.check_input(name, x)
        coder = self.coder(name)
        if dead is not None and (dead.shape != (self.n_latents,) or dead.dtype != torch.bool):
            raise ValueError(f"encode_train: dead must be bool [{self.n_latents}], got {dead.dtype} "
                             f"{tuple(dead.shape)}")
        columns = None if dead is None else dead.nonzero().squeeze(1)
        every = columns is not None and columns.numel() == self.n_latents
        if x.device.type == "cpu" and not bf16:  # blocked: the [N, m] pre-activations never exist at once
            some = columns is not None and 0 < columns.numel() < self.n_latents
            got = encoder_topk(coder.linear, coder.bn, x, self.k, columns=columns if some else None,
                               all_columns=every)
            enc, indices, values, kept = got.enc, got.indices, got.values, got.columns_pre
        else:
            enc = encoder_forward(coder.linear, coder.bn, x, out=out, bf16=bf16)
            indices, values, kept = topk_indices(enc.pre, self.k), None, None
        groups = group_by_latent(indices, self.n_latents)
        code = SparseCode(F.relu(gather_pre(enc, indices, groups, values)), indices, self.n_latents)
        code.use_groups(groups)  # shared by the encoder's and the decoders' backward
        if columns is None or columns.numel() == 0:
            return TrainEncoding(code)
        return TrainEncoding(code, dense_pre(enc, None if every else columns, kept), columns)

    def encode_pre_train(self, name: str, x: Tensor, *, bf16: bool = False) -> Tensor:
        """Training-mode pre-activations [N, m] with the fused encoder's exact backward (dense gradient; for
        the official auxiliary loss). Same values and gradients as ``encode_pre`` in training mode."""
        self.check_input(name, x)
        coder = self.coder(name)
        return dense_pre(encoder_forward(coder.linear, coder.bn, x, bf16=bf16))

    def dictionary(self, name: str, *, frozen: bool = False) -> Tensor:
        """Unit-row dictionary of model ``name``: [m, d] (differentiable w.r.t. the raw weight).

        frozen=True: without gradient, and computed again only when the raw weight changed since the last
        call (a training step that does not update this model reuses it).
        """
        raw = self.coder(name).dictionary
        if not frozen:
            return normalise_rows(raw)
        cache = self.__dict__.setdefault("_frozen_dictionaries", {})
        key = (raw.data_ptr(), raw._version, raw.dtype, raw.device)
        if name not in cache or cache[name][0] != key:
            with torch.no_grad():
                cache[name] = (key, normalise_rows(raw))
        return cache[name][1]

    def decode(self, code: SparseCode, targets: Sequence[str] | None = None, *,
               frozen: Collection[str] = (), backend: str = "auto") -> dict[str, Tensor]:
        """Decode one code into ``targets`` (default: every model, in ``names`` order) -> {name: [N, d]}.

        Decoders named in ``frozen`` are used without gradient (the trainer's non-updated decoders).
        """
        if not isinstance(code, SparseCode) or code.n_latents != self.n_latents:
            got = code.n_latents if isinstance(code, SparseCode) else type(code).__name__
            raise ValueError(f"decode: code has n_latents={got}; expected a SparseCode with {self.n_latents}")
        targets = self.names if targets is None else tuple(targets)
        if not targets:
            return {}
        weights = [self.dictionary(n, frozen=n in frozen) for n in targets]
        return dict(zip(targets, sparse_decode_many(code, weights, backend), strict=True))

    def forward(self, name: str, x: Tensor, targets: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Encode with model ``name`` and decode into ``targets`` (default all)."""
        return self.decode(self.encode(name, x), targets)

    # -- standardisation ---------------------------------------------------------------------------------
    def set_standardisation(self, name: str, mean: Tensor | float, std: Tensor | float) -> None:
        """Store model ``name``'s standardisation: scalars or [d] vectors, applied as (x - mean)/(std + 1e-5)."""
        coder, d = self.coder(name), self.dims[name]
        ref = coder.dictionary
        mean_t = torch.as_tensor(mean, dtype=torch.float32).to(ref.device)
        std_t = torch.as_tensor(std, dtype=torch.float32).to(ref.device)
        for label, t in (("mean", mean_t), ("std", std_t)):
            if t.shape not in ((), (d,)):
                raise ValueError(f"standardisation {label} for {name!r} has shape {tuple(t.shape)}; "
                                 f"expected [] or [{d}]")
            if not torch.isfinite(t).all():
                raise ValueError(f"standardisation {label} for {name!r} contains NaN/Inf")
        if (std_t < 0).any():
            raise ValueError(f"standardisation std for {name!r} is negative; expected >= 0")
        coder.standard_mean, coder.standard_std = mean_t.clone(), std_t.clone()

    def standardisation(self, name: str) -> tuple[Tensor, Tensor] | None:
        """(mean, std) of model ``name``, or None when none was set."""
        coder = self.coder(name)
        return None if coder.standard_mean is None else (coder.standard_mean, coder.standard_std)

    def standardise(self, name: str, raw: Tensor) -> Tensor:
        """Raw activations [N, d] -> standardised ones (ValueError when no statistics were set)."""
        stats = self.standardisation(name)
        if stats is None:
            raise ValueError(f"no standardisation set for {name!r}; call set_standardisation first")
        return (raw - stats[0]) / (stats[1] + STANDARDISATION_EPS)

    # -- persistence --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (the JSON config in its metadata) atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {key: t.detach().cpu().contiguous() for key, t in self.state_dict().items()}
        meta = {"format": _FORMAT, "config": json.dumps(self.config())}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def read_config(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The config stored in a file written by ``save`` (ValueError for any other file)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a UniversalSAE file (format {meta.get('format')!r}, expected {_FORMAT!r})")
        return json.loads(meta["config"])

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> UniversalSAE:
        """Rebuild a model written by ``save`` (weights, BN statistics, standardisation)."""
        config = cls.read_config(path)
        # files written before the init option have no "init": it only set the starting point, so any will do
        model = cls(config["dims"], config["n_latents"], config["k"], config["encoder"],
                    config.get("init", "official"))
        tensors = {}
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        model.load_tensors(tensors)
        return model.to(map_location)

    def load_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Load a state dict (strict), including standardisation buffers when present."""
        width = tensors.get("coders.0.dictionary")
        if isinstance(width, Tensor) and width.dim() == 2 and width.shape[0] != self.n_latents:
            raise ValueError(f"state does not match this UniversalSAE: it has n_latents = {width.shape[0]}, the "
                             f"model has n_latents = {self.n_latents}; build the model with n_latents="
                             f"{width.shape[0]} or use UniversalSAE.load(path), which reads the width from the file")
        for i in range(len(self.coders)):
            mean, std = tensors.get(f"coders.{i}.standard_mean"), tensors.get(f"coders.{i}.standard_std")
            if (mean is None) != (std is None):
                raise ValueError(f"coders.{i}: standardisation needs both mean and std")
            if mean is not None:
                self.set_standardisation(self.names[i], mean, std)
        try:
            missing, unexpected = self.load_state_dict(dict(tensors), strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"state does not match this UniversalSAE {self.config()}: {err}") from err
        if missing or unexpected:
            raise ValueError(f"state does not match this UniversalSAE {self.config()}: missing {missing}, "
                             f"unexpected {unexpected}")
