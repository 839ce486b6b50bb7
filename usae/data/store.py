"""``ActivationStore``: row-aligned, sharded, memory-mapped activations of several models (the reader).

On disk (all paths relative to the store folder)::

    manifest.json                          written last; its presence marks a complete store
    <split>/<model>/<shard:05d>.npy        [rows, d] float16/float32, one file per shard of whole images
    <split>/labels/<factor>.npy            [n_rows] int32 per-token labels (optional; toy-world truth)

Row ``r`` of split ``s`` is image ``r // tokens_per_image``, token ``r % tokens_per_image`` in row-major grid
order, for every model: ``store.rows(s, m, a, b)`` of two models describe the same image patches.
The writer fills a hidden temp folder next to the target and renames it into place only after the manifest
is written, so an interrupted extraction never leaves anything that opens as a store. Given a fixed
``work_dir`` the writer is resumable: completed shards are recorded with checksums in ``progress.json`` and a
rerun keeps the ones that still verify (see :class:`usae.data.store_writer.StoreWriter`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from usae._checks import positive_int
from usae.data.batches import epoch_plan
from usae.data.standardisation import Standardisation

FORMAT = "usae-activation-store"
VERSION = 1
DTYPES = ("float16", "float32")


class StoreError(ValueError):
    """A store that cannot be used: incomplete, corrupted, or written by another configuration."""


# --------------------------------------------------------------------------------------------------- helpers
def plain_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (str, numbers, bools, None, lists, dicts): {exc}")


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of a .npy file, read from its header only."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return tuple(shape), np.dtype(dtype), f.tell()


def check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if not path.is_file():
        raise StoreError(f"store file {str(path)!r} is missing; the store is incomplete, re-extract it")
    try:
        got_shape, got_dtype, offset = _npy_header(path)
    except Exception as exc:
        raise StoreError(f"store file {str(path)!r} is corrupted (unreadable .npy header: {exc}); re-extract")
    if got_shape != shape or got_dtype != dtype:
        raise StoreError(f"store file {str(path)!r} holds {got_dtype}{list(got_shape)} but the manifest says "
                         f"{dtype}{list(shape)}; the store is corrupted, re-extract it")
    size, want = path.stat().st_size, offset + math.prod(shape) * dtype.itemsize
    if size != want:
        raise StoreError(f"store file {str(path)!r} has {size} bytes but should have {want} (truncated or "
                         "corrupted); re-extract the store")


# ------------------------------------------------------------------------------------------------- reader
class ActivationStore:
    """A complete store opened read-only; see the module docstring for the layout."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.progress = True  # whether passes over this store show progress bars by default
        self.models: tuple[str, ...] = tuple(manifest["models"])
        self.dims: dict[str, int] = {m: int(manifest["dims"][m]) for m in self.models}
        self.grid: int = int(manifest["grid"])
        self.tokens_per_image: int = int(manifest["tokens_per_image"])
        self.dtype: str = manifest["dtype"]
        self.meta: dict[str, Any] = manifest["meta"]
        self.stats: dict[str, Standardisation] = {m: Standardisation.from_dict(manifest["stats"][m])
                                                  for m in self.models}
        self.splits: tuple[str, ...] = tuple(manifest["splits"])
        self._bounds = {s: np.cumsum([0] + [sh["rows"] for sh in info["shards"]])
                        for s, info in manifest["splits"].items()}
        self._maps: dict[tuple[str, str], list[np.memmap]] = {}

    @classmethod
    def open(cls, path: str | Path, expect_meta: Mapping[str, Any] | None = None) -> "ActivationStore":
        """Open and validate the store at ``path`` (every shard's header and size against the manifest).

        ``expect_meta``: when given, the store's ``meta`` must equal it (after a JSON round trip), else
        StoreError naming the differing keys (the store was written by another configuration).
        """
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not path.is_dir():
            raise StoreError(f"no activation store at {str(path)!r} (not a folder)")
        if not manifest_path.is_file():
            raise StoreError(f"{str(path)!r} has no manifest.json, so it is not a complete activation store "
                             "(an interrupted extraction leaves none); re-extract it")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{str(manifest_path)!r} is not valid JSON ({exc}); re-extract the store")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{str(manifest_path)!r} is not a {FORMAT} manifest")
        if manifest.get("version") != VERSION:
            raise StoreError(f"store version {manifest.get('version')!r} is not supported (this code reads "
                             f"version {VERSION}); re-extract the store")
        dtype = np.dtype(manifest["dtype"])
        for split, info in manifest["splits"].items():
            if sum(sh["rows"] for sh in info["shards"]) != info["n_rows"]:
                raise StoreError(f"manifest of {str(path)!r}: shard rows of split {split!r} do not add up")
            for sh in info["shards"]:
                for m, rel in sh["files"].items():
                    check_npy(path / rel, (sh["rows"], int(manifest["dims"][m])), dtype)
            for rel in info.get("labels", {}).values():
                check_npy(path / rel, (info["n_rows"],), np.dtype(np.int32))
        store = cls(path, manifest)
        if expect_meta is not None:
            want = plain_json(dict(expect_meta), "expect_meta")
            if want != store.meta:
                keys = sorted(k for k in set(want) | set(store.meta) if want.get(k) != store.meta.get(k))
                detail = "; ".join(f"{k}: store has {store.meta.get(k)!r:.80}, expected {want.get(k)!r:.80}"
                                   for k in keys[:5])
                raise StoreError(f"the store at {str(path)!r} was written by another configuration ({detail}); "
                                 "re-extract it")
        return store

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}: {self.n_rows(s)} rows" for s in self.splits)
        return (f"ActivationStore({str(self.path)!r}, models={list(self.models)}, dims={self.dims}, "
                f"grid={self.grid}, dtype={self.dtype}, {sizes})")

    # -------------------------------------------------------------------------------------------- access
    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise ValueError(f"unknown split {split!r}; this store has {list(self.splits)}")
        return self.manifest["splits"][split]

    def _model(self, model: str) -> None:
        if model not in self.dims:
            raise ValueError(f"unknown model {model!r}; this store has {list(self.models)}")

    def _shards(self, split: str, model: str) -> list[np.memmap]:
        key = (split, model)
        if key not in self._maps:
            self._maps[key] = [np.load(self.path / sh["files"][model], mmap_mode="r")
                               for sh in self._split(split)["shards"]]
        return self._maps[key]

    def n_rows(self, split: str) -> int:
        return int(self._split(split)["n_rows"])

    def n_images(self, split: str) -> int:
        return int(self._split(split)["n_images"])

    def _read(self, split: str, model: str, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``start .. stop`` into ``out [stop - start, d]`` (may span shards)."""
        bounds, shards = self._bounds[split], self._shards(split, model)
        pos = start
        while pos < stop:
            i = int(np.searchsorted(bounds, pos, side="right")) - 1
            end = min(stop, int(bounds[i + 1]))
            out[pos - start:end - start] = shards[i][pos - bounds[i]:end - bounds[i]]
            pos = end

    def rows(self, split: str, model: str, start: int, stop: int) -> Tensor:
        """Rows ``start .. stop`` of ``model`` as float32 ``[stop - start, d]``."""
        self._model(model)
        n = self.n_rows(split)
        if isinstance(start, np.integer) or isinstance(stop, np.integer):
            start, stop = int(start), int(stop)
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
            raise ValueError(f"rows {start!r}..{stop!r} are not valid for split {split!r}; expected "
                             f"0 <= start <= stop <= {n}")
        out = np.empty((stop - start, self.dims[model]), dtype=self.dtype)
        self._read(split, model, start, stop, out)
        return torch.from_numpy(out).float()

    def labels(self, split: str) -> dict[str, np.ndarray]:
        """Per-token integer labels ``factor -> [n_rows]`` (read-only memory maps; empty if none)."""
        return {name: np.load(self.path / rel, mmap_mode="r")
                for name, rel in self._split(split).get("labels", {}).items()}

    # ------------------------------------------------------------------------------------------- batches
    def _blocks(self, split: str, block_rows: int) -> list[tuple[int, int]]:
        bounds = self._bounds[split]
        return [(a, min(a + block_rows, int(hi)))
                for lo, hi in zip(bounds[:-1], bounds[1:]) for a in range(int(lo), int(hi), block_rows)]

    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                models: Sequence[str] | None = None, block_rows: int = 2048, window_rows: int | None = None,
                device: str | torch.device | None = None) -> Iterator[dict[str, Tensor]]:
        """One epoch of aligned batches ``{model: [batch_size, d] float32}``: ``batch[m][i]`` is the same
        image patch for every model ``m``. Every row appears exactly once (the last partial batch only when
        ``drop_last=False``).

        Shuffling with bounded memory: the rows are cut into blocks of ``block_rows`` contiguous rows, the
        blocks are visited in a random order, ``window_rows`` rows' worth of blocks are read at a time (default
        ``max(65536, 4 * batch_size)``) and shuffled together with the rows left over from the previous window.
        Same ``seed`` -> same batches. ``device``: where the batches are made; on a GPU each window is copied
        there in the store's dtype and the shuffling gather and the float32 conversion run on the GPU.
        """
        self._split(split)
        names = tuple(self.models if models is None else models)
        if not names:
            raise ValueError("models is empty; expected at least one model name")
        for m in names:
            self._model(m)
        positive_int("block_rows", block_rows)
        device = torch.device("cpu" if device is None else device)
        torch_dtype = torch.float16 if self.dtype == "float16" else torch.float32
        carry = {m: torch.empty(0, self.dims[m], dtype=torch_dtype, device=device) for m in names}
        for window in epoch_plan(self._blocks(split, block_rows), batch_size, shuffle=shuffle, seed=seed,
                                 window_rows=window_rows, drop_last=drop_last):
            n = len(window.ids)
            rows = {}
            for m in names:
                buf = np.empty((n, self.dims[m]), dtype=self.dtype)
                pos = window.n_carry
                for a, b in window.blocks:
                    self._read(split, m, a, b, buf[pos:pos + b - a])
                    pos += b - a
                rows[m] = torch.from_numpy(buf).to(device)
                rows[m][:window.n_carry] = carry[m]  # the (< batch_size) rows left over from the last window
            for positions in window.batches:
                idx = positions.to(device)
                yield {m: rows[m].index_select(0, idx).float() for m in names}
            rest = window.rest.to(device)
            carry = {m: rows[m].index_select(0, rest) for m in names}
