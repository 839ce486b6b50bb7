"""Files on disk: atomic writes, stale temporaries, a cross-process lock, disk-full errors, safetensors I/O."""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Temporary files that ``atomic_write`` left under ``folder`` when its process was killed mid-write."""
    return [p for p in Path(folder).rglob(".*.tmp-*") if p.is_file() and re.fullmatch(r"\..+\.tmp-\d+.*", p.name)]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place, so a reader never
    sees a half-written file; the temporary file is removed if ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # some writers (safetensors) create 0600 files
        os.replace(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise disk_full(path, err) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def disk_full(path: str | os.PathLike, err: OSError | None = None) -> OSError:
    """The error to raise when writing ``path`` ran out of disk space (``errno.ENOSPC``)."""
    detail = f" ({err.strerror})" if err is not None and err.strerror else ""
    return OSError(errno.ENOSPC, f"no space left on the device while writing {str(path)!r}{detail}; free some "
                   "space or write elsewhere (e.g. set USAE_RUNS), then run again: nothing half-written was kept "
                   "and an existing file of that name is unchanged")


class FileLock:
    """An exclusive advisory lock (``flock``) on the file ``path``, created if missing.

    The operating system releases it when the holder exits, even on ``kill -9``, so a lock never outlives its
    process. ``acquire`` waits for another holder (saying so on stderr once). A no-op where ``fcntl`` is missing.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that holds {str(self.path)!r} ...", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Release the lock; ``remove=True`` also deletes the lock file (when the guarded work is finished)."""
        if self._fd is None:
            return
        if remove:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` (contiguous) and string ``metadata`` as one safetensors file, atomically."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(every tensor by name, the string metadata) of a safetensors file written by :func:`save_tensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
