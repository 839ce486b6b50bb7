"""``StoreWriter``: writes an :class:`~usae.data.store.ActivationStore` atomically, and resumes a killed extraction.

Shards are filled in a hidden temp folder (or a fixed ``work_dir``) next to the target; the manifest is
written last and the folder renamed into place, so an interrupted extraction never leaves anything that opens
as a store. With a ``work_dir``, completed shards are recorded with checksums in ``progress.json`` and a rerun
keeps the ones that still verify.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from usae._io import FileLock, atomic_write, disk_full, stale_temp_files
from usae.data.standardisation import Standardisation
from usae.data.store import DTYPES, FORMAT, VERSION, ActivationStore, StoreError, check_npy, plain_json
from usae._checks import positive_int

_WORK_FORMAT = "usae-store-work"


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _rows_crc(path: Path, start: int, stop: int) -> int:
    return zlib.crc32(np.ascontiguousarray(np.load(path, mmap_mode="r")[start:stop]).tobytes())


def _preallocate(path: Path) -> None:
    """Reserve the disk blocks of a freshly created (sparse) file now, so that a full disk fails here with a
    clear OSError instead of crashing later (SIGBUS) when a memory-mapped page is first written."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise disk_full(path, err) from err
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


class StoreWriter:
    """Fills a new store in a work folder; ``finish`` writes the manifest and renames it to ``out``.

    Use as a context manager. ``shard_bytes`` bounds a shard of the widest model; every model shares the same
    shard boundaries (whole images). Shard files are allocated in full when created, so a full disk fails at
    once with a clear ``OSError`` (``errno.ENOSPC``).

    ``work_dir=None`` (default): a fresh hidden temp folder next to ``out``, removed on any failure. A fixed
    ``work_dir`` makes the writing resumable: once all rows of a shard (every model and every label) are
    written, the shard is recorded with CRC32 checksums of its data in ``work_dir/progress.json``. An
    interrupted writer (exception, Ctrl-C, ``kill -9``) leaves the folder; a writer opened again on it with the
    same ``dims``, ``grid``, ``dtype``, ``shard_bytes`` and ``identity`` keeps every recorded shard whose files
    still match their checksums (``shards(split)`` says which) and starts everything else afresh; with other
    settings the old work is discarded. The work folder never holds a manifest until its store is complete, and
    one process at a time uses it (a lock file ``<work_dir>.lock`` beside it; a second writer waits).
    """

    def __init__(self, out: str | Path, dims: Mapping[str, int], grid: int, dtype: str = "float16",
                 overwrite: bool = False, shard_bytes: int = 1 << 30, *, work_dir: str | Path | None = None,
                 identity: Mapping[str, Any] | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype = {dtype!r} is not valid; expected one of {list(DTYPES)}")
        if not dims or any(not isinstance(d, int) or d <= 0 for d in dims.values()):
            raise ValueError(f"dims = {dict(dims)!r} is not valid; expected model name -> positive width")
        positive_int("grid", grid)
        positive_int("shard_bytes", shard_bytes)
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{str(self.out)!r} already exists; pass overwrite=True to replace it")
        self.dims, self.grid, self.dtype = dict(dims), grid, np.dtype(dtype)
        self.tokens_per_image = grid * grid
        self.overwrite, self.shard_bytes = overwrite, shard_bytes
        self.identity = plain_json(dict(identity or {}), "identity")
        self.splits: dict[str, dict[str, Any]] = {}
        self._open: dict[tuple[str, str], tuple[int, np.memmap]] = {}
        self._labels: dict[tuple[str, str], np.memmap] = {}
        self._written: dict[tuple[str, str], int] = {}
        self._fill: dict[tuple[str, int], dict[str, int]] = {}  # rows written per shard, per model / label
        self._journal: dict[str, Any] | None = None
        self._lock: FileLock | None = None
        self._closed = False
        if work_dir is None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
            self.tmp.mkdir()
        else:
            self.tmp = Path(work_dir)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(self.tmp.with_name(self.tmp.name + ".lock")).acquire()
            try:
                self._journal = self._open_journal()
            except BaseException:
                self._lock.release()
                raise

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._closed:  # an exception, or leaving the block without finish()
            self.abort()

    # -- resumable work ---------------------------------------------------------------------------------------
    def _open_journal(self) -> dict[str, Any]:
        path = self.tmp / "progress.json"
        want = plain_json({"dims": self.dims, "grid": self.grid, "dtype": self.dtype.name,
                            "shard_bytes": self.shard_bytes, "identity": self.identity}, "identity")
        if self.tmp.exists():
            if not self.tmp.is_dir():
                raise ValueError(f"work_dir = {str(self.tmp)!r} is a file; expected a folder for the unfinished store")
            try:
                journal = json.loads(path.read_text())
            except FileNotFoundError:
                journal = None
            except (OSError, ValueError) as exc:
                raise ValueError(f"{str(path)!r} is unreadable ({exc}); remove the folder {str(self.tmp)!r} and "
                                 "extract again") from None
            stale = stale_temp_files(self.tmp)  # a run killed inside atomic_write (e.g. of progress.json)
            # no journal but a manifest: a complete store killed before its rename (ours); rebuilt below
            if journal is None and not (self.tmp / "manifest.json").is_file() and \
                    any(p not in stale for p in self.tmp.iterdir()):
                raise ValueError(f"work_dir = {str(self.tmp)!r} holds files but no progress.json, so it is not an "
                                 "unfinished store; give an empty or new folder")
            if journal is not None and (not isinstance(journal, dict) or journal.get("format") != _WORK_FORMAT):
                raise ValueError(f"{str(path)!r} is not a {_WORK_FORMAT} file; give an empty or new work_dir")
            if journal is not None and journal.get("identity") == want:
                for tmp in stale:
                    tmp.unlink(missing_ok=True)
                return journal
            shutil.rmtree(self.tmp)  # our own unfinished work, for other settings: start afresh
        self.tmp.mkdir(parents=True)
        journal = {"format": _WORK_FORMAT, "identity": want, "splits": {}, "stats": None, "done": {}}
        self._save_journal(journal)
        return journal

    def _save_journal(self, journal: dict[str, Any] | None = None) -> None:
        journal = journal if journal is not None else self._journal
        if journal is not None:
            atomic_write(self.tmp / "progress.json", lambda p: p.write_text(json.dumps(journal)))

    @property
    def resumed_stats(self) -> dict[str, Standardisation] | None:
        """The standardisation recorded in the work folder by an earlier, interrupted run (else ``None``)."""
        if self._journal is None or not self._journal.get("stats"):
            return None
        return {m: Standardisation.from_dict(self._journal["stats"][m]) for m in self.dims}

    def record_stats(self, stats: Mapping[str, Standardisation]) -> None:
        """Record the standardisation the rows are written with (so a resumed run reuses it). Recorded shards
        written with other statistics are discarded (only possible before any split is added)."""
        if self._journal is None:
            return
        missing = sorted(set(self.dims) - set(stats))
        if missing:
            raise ValueError(f"no standardisation given for models {missing}")
        new = {m: stats[m].to_dict() for m in self.dims}
        if self._journal["stats"] not in (None, new):
            if self.splits:
                raise ValueError("record_stats: the statistics changed after splits were added; record them first")
            self._journal["done"] = {}
        self._journal["stats"] = new
        self._save_journal()

    def discard_done(self) -> None:
        """Forget every shard recorded by an earlier run (call before adding splits)."""
        if self._journal is not None:
            if self.splits:
                raise ValueError("discard_done: call it before adding splits")
            self._journal["done"] = {}
            self._save_journal()

    def shards(self, split: str) -> list[tuple[int, int, bool]]:
        """``(first image, stop image, done)`` per shard of ``split``; ``done``: complete and verified (kept from
        an interrupted run, or finished in this one), so its images need not be written again."""
        info = self._split_info(split)
        done = self._journal["done"].get(split, {}) if self._journal is not None else {}
        t = self.tokens_per_image
        return [(start // t, (start + rows) // t, str(i) in done)
                for i, (start, rows) in enumerate(zip(info["shard_starts"], info["shard_rows"]))]

    def _split_info(self, split: str) -> dict[str, Any]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; add it first (have {list(self.splits)})")
        return self.splits[split]

    def _verified(self, split: str, index: int, entry: Any) -> bool:
        """Whether a recorded shard's files are all present, of the right shape and match their checksums."""
        info = self.splits[split]
        try:
            if not 0 <= index < len(info["shard_rows"]):
                return False
            rows, start = info["shard_rows"][index], info["shard_starts"][index]
            if sorted(entry["files"]) != sorted(self.dims):
                return False
            for m in self.dims:
                path = self.tmp / split / m / f"{index:05d}.npy"
                check_npy(path, (rows, self.dims[m]), self.dtype)
                if _file_crc(path) != entry["files"][m]:
                    return False
            for name, crc in entry["labels"].items():
                path = self.tmp / split / "labels" / f"{name}.npy"
                check_npy(path, (info["n_rows"],), np.dtype(np.int32))
                if _rows_crc(path, start, start + rows) != crc:
                    return False
        except (StoreError, OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return True

    def _resume_split(self, split: str, n_images: int) -> None:
        """Keep the verified shards of ``split`` recorded by an earlier run, delete the files of the others."""
        journal, info = self._journal, self.splits[split]
        if journal["splits"].get(split) != n_images:
            journal["done"].pop(split, None)
        journal["splits"][split] = n_images
        kept = {}
        for key, entry in journal["done"].get(split, {}).items():
            index = int(key) if str(key).isdigit() else -1
            if self._verified(split, index, entry):
                kept[key] = entry
        labels = list(next(iter(kept.values()))["labels"]) if kept else []  # in the order first written
        kept = {k: e for k, e in kept.items() if sorted(e["labels"]) == sorted(labels)}  # one set for the split
        for key, entry in kept.items():
            rows = info["shard_rows"][int(key)]
            for name in labels:
                info["labels"][name] = f"{split}/labels/{name}.npy"
            for k in [*self.dims, *labels]:
                self._written[(split, k)] = self._written.get((split, k), 0) + rows
                self._fill.setdefault((split, int(key)), {})[k] = rows
        journal["done"][split] = kept
        for i in range(len(info["shard_rows"])):
            if str(i) not in kept:
                for m in self.dims:
                    (self.tmp / split / m / f"{i:05d}.npy").unlink(missing_ok=True)
        self._save_journal()

    def _filled(self, split: str, index: int, key: str, count: int) -> None:
        fill = self._fill.setdefault((split, index), {})
        fill[key] = fill.get(key, 0) + count
        info = self.splits[split]
        rows = info["shard_rows"][index]
        done = self._journal["done"].setdefault(split, {})
        if str(index) in done or any(fill.get(k, 0) != rows for k in [*self.dims, *info["labels"]]):
            return
        files = {}
        for m in self.dims:
            if (split, m) in self._open and self._open[(split, m)][0] == index:
                self._open.pop((split, m))[1].flush()
            files[m] = _file_crc(self.tmp / split / m / f"{index:05d}.npy")
        start, labels = info["shard_starts"][index], {}
        for name in info["labels"]:
            mm = self._labels[(split, name)]
            mm.flush()
            labels[name] = zlib.crc32(np.ascontiguousarray(mm[start:start + rows]).tobytes())
        done[str(index)] = {"files": files, "labels": labels}
        self._save_journal()

    # -- writing ------------------------------------------------------------------------------------------------
    def add_split(self, split: str, n_images: int) -> None:
        """Declare a split of ``n_images`` images (rows = n_images * tokens_per_image)."""
        if not isinstance(split, str) or not split or "/" in split or split.startswith("."):
            raise ValueError(f"split name {split!r} is not valid; expected a plain folder name")
        if split in self.splits:
            raise ValueError(f"split {split!r} was already added")
        if not isinstance(n_images, int) or n_images <= 0:
            raise ValueError(f"split {split!r}: n_images = {n_images!r} is not valid; expected > 0")
        row_bytes = self.tokens_per_image * max(self.dims.values()) * self.dtype.itemsize
        per_shard = max(1, min(n_images, self.shard_bytes // row_bytes))
        starts = list(range(0, n_images, per_shard))
        shards = [min(per_shard, n_images - s) * self.tokens_per_image for s in starts]
        self.splits[split] = {"n_images": n_images, "n_rows": n_images * self.tokens_per_image,
                              "shard_rows": shards, "shard_starts": [s * self.tokens_per_image for s in starts],
                              "labels": {}}
        if self._journal is not None:
            self._resume_split(split, n_images)

    def _shard(self, split: str, model: str, index: int) -> np.memmap:
        key = (split, model)
        if key in self._open and self._open[key][0] == index:
            return self._open[key][1]
        if key in self._open:  # writes are sequential: the previous shard is done
            self._open.pop(key)[1].flush()
        path = self.tmp / split / model / f"{index:05d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.splits[split]["shard_rows"][index]
        fresh = not path.exists()
        try:
            mm = np.lib.format.open_memmap(path, mode="w+" if fresh else "r+", dtype=self.dtype,
                                           shape=(rows, self.dims[model]))
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise disk_full(path, err) from err
            raise
        if fresh:
            _preallocate(path)
        self._open[key] = (index, mm)
        return mm

    def write(self, split: str, model: str, row0: int, rows: Tensor | np.ndarray) -> None:
        """Write ``rows [n, d]`` at rows ``row0 .. row0 + n`` of ``split`` for ``model``."""
        info = self._split_info(split)
        if model not in self.dims:
            raise ValueError(f"unknown model {model!r}; expected one of {list(self.dims)}")
        if isinstance(rows, Tensor):
            rows = rows.detach().to(torch.float16 if self.dtype == np.float16 else torch.float32).cpu().numpy()
        n = rows.shape[0]
        if rows.ndim != 2 or rows.shape[1] != self.dims[model] or row0 < 0 or row0 + n > info["n_rows"]:
            raise ValueError(f"rows of shape {rows.shape} at row {row0} do not fit split {split!r} "
                             f"({info['n_rows']} rows) of model {model!r} (d={self.dims[model]})")
        done = 0
        while done < n:
            r = row0 + done
            index = int(np.searchsorted(info["shard_starts"], r, side="right")) - 1
            local = r - info["shard_starts"][index]
            take = min(n - done, info["shard_rows"][index] - local)
            self._shard(split, model, index)[local:local + take] = rows[done:done + take]
            done += take
            if self._journal is not None:
                self._filled(split, index, model, take)
        self._written[(split, model)] = self._written.get((split, model), 0) + n

    def write_labels(self, split: str, name: str, row0: int, values: Tensor | np.ndarray) -> None:
        """Write per-token integer labels ``values [n]`` of factor ``name`` at rows ``row0 ..``.

        With a ``work_dir``, write a shard's labels no later than its last activation rows (a shard is recorded
        as complete once every model and every label known so far covers it)."""
        info = self._split_info(split)
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"label name {name!r} is not valid; expected a plain file name")
        values = values.cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
        if values.dtype.kind not in "iub":
            raise ValueError(f"labels {name!r} of dtype {values.dtype} are not valid; expected integers")
        key = (split, name)
        if row0 < 0 or values.ndim != 1 or row0 + len(values) > info["n_rows"]:
            raise ValueError(f"labels {name!r} of shape {values.shape} at row {row0} do not fit split {split!r}")
        if key not in self._labels:
            path = self.tmp / split / "labels" / f"{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            reuse = name in info["labels"] and path.is_file()  # holds the rows of shards kept from an earlier run
            try:
                self._labels[key] = np.lib.format.open_memmap(path, mode="r+" if reuse else "w+", dtype=np.int32,
                                                              shape=(info["n_rows"],))
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise disk_full(path, err) from err
                raise
            if not reuse:
                _preallocate(path)
            info["labels"][name] = f"{split}/labels/{name}.npy"
        self._labels[key][row0:row0 + len(values)] = values
        self._written[key] = self._written.get(key, 0) + len(values)
        if self._journal is not None:
            pos, stop = row0, row0 + len(values)
            while pos < stop:
                index = int(np.searchsorted(info["shard_starts"], pos, side="right")) - 1
                end = min(stop, info["shard_starts"][index] + info["shard_rows"][index])
                self._filled(split, index, name, end - pos)
                pos = end

    def finish(self, stats: Mapping[str, Standardisation], meta: Mapping[str, Any] | None = None
               ) -> "ActivationStore":
        """Flush, write the manifest last, rename the work folder to ``out``; returns the opened store."""
        missing = sorted(set(self.dims) - set(stats))
        if missing:
            raise ValueError(f"no standardisation given for models {missing}")
        if not self.splits:
            raise ValueError("a store needs at least one split")
        for split, info in self.splits.items():
            for key in [*self.dims, *info["labels"]]:
                if self._written.get((split, key), 0) != info["n_rows"]:
                    hint = (f"; remove the unfinished work folder {str(self.tmp)!r} and extract again"
                            if self._journal is not None else "")
                    raise ValueError(f"split {split!r}, {key!r}: {self._written.get((split, key), 0)} rows were "
                                     f"written, expected each of the {info['n_rows']} rows exactly once{hint}")
        self._close_maps()
        splits = {}
        for split, info in self.splits.items():
            shards = []
            for i, rows in enumerate(info["shard_rows"]):
                shards.append({"rows": rows, "files": {m: f"{split}/{m}/{i:05d}.npy" for m in self.dims}})
            splits[split] = {"n_images": info["n_images"], "n_rows": info["n_rows"], "shards": shards,
                             "labels": dict(info["labels"])}
        manifest = {
            "format": FORMAT, "version": VERSION, "models": list(self.dims), "dims": self.dims,
            "grid": self.grid, "tokens_per_image": self.tokens_per_image, "dtype": self.dtype.name,
            "stats": {m: stats[m].to_dict() for m in self.dims}, "splits": splits,
            "meta": plain_json(dict(meta or {}), "meta"),
        }
        tmp_manifest = self.tmp / "manifest.json.tmp"
        try:
            with open(tmp_manifest, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            tmp_manifest.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise disk_full(self.tmp / "manifest.json", err) from err
            raise
        os.replace(tmp_manifest, self.tmp / "manifest.json")
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        (self.out / "progress.json").unlink(missing_ok=True)  # kept until here: a kill before the rename resumes
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._closed = True
        if self._lock is not None:
            self._lock.release(remove=True)
        return ActivationStore.open(self.out)

    def _close_maps(self) -> None:
        """Flush and drop every open shard and label memory map."""
        for _, mm in self._open.values():
            mm.flush()
        for mm in self._labels.values():
            mm.flush()
        self._open.clear()
        self._labels.clear()

    def abort(self) -> None:
        """Stop writing. Without a ``work_dir`` everything written so far is removed; with one, the shards
        recorded as complete stay there for a later writer to resume from."""
        self._close_maps()
        self._closed = True
        if self._lock is None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self._lock.release()
