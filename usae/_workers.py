"""Run Python functions in fresh interpreter processes, up to a number of them at once.

The zoo (one process per toy model), ``Experiment.train_side_by_side`` (one per SAE) and ``usae book`` (one per
notebook) all start workers the same way: a ``python -c`` call of a module-level function with string
arguments, stdout discarded, stderr kept in a temporary file (a file, not a pipe, so a chatty worker never
blocks on it) and its last line reported when the worker fails.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Call:
    """One worker: ``module.function(*args)`` in a fresh interpreter, keyed by ``key`` in the callbacks."""

    key: Hashable
    module: str
    function: str
    args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [sys.executable, "-c", f"import sys; from {self.module} import {self.function}; "
                f"{self.function}(*sys.argv[1:])", *self.args]


@dataclass(frozen=True)
class Done:
    """A finished worker: its ``key``, exit code, wall seconds and the last line of its stderr ("" if none)."""

    key: Hashable
    returncode: int
    seconds: float
    last_error_line: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def reason(self) -> str:
        """Why it failed, in one line: the last line of its stderr, or its exit code."""
        return self.last_error_line or f"exit code {self.returncode}"


def run_calls(calls: Sequence[Call], slots: int, env: Mapping[str, str], on_done: Callable[[Done], None],
              cwd: Path | None = None, on_poll: Callable[[dict[Hashable, int], int], None] | None = None) -> None:
    """Run ``calls`` in order, at most ``slots`` at a time, each in its own process with environment ``env``.

    ``on_done(done)`` is called as each one ends (in the caller's process; an exception there stops the rest).
    ``on_poll(pids, n_pending)`` is called after each poll with the running workers' pids by key. Workers
    still running when this returns by an exception are killed."""
    if slots < 1:
        raise ValueError(f"slots = {slots!r} is not valid; expected a positive int")
    pending = list(calls)
    running: dict[Hashable, tuple[subprocess.Popen, IO[bytes], float]] = {}
    try:
        while pending or running:
            while pending and len(running) < slots:
                call = pending.pop(0)
                log = tempfile.TemporaryFile()
                proc = subprocess.Popen(call.argv(), cwd=cwd, env=dict(env), stdout=subprocess.DEVNULL, stderr=log)
                running[call.key] = (proc, log, time.perf_counter())
            time.sleep(_POLL_SECONDS)
            if on_poll is not None:
                on_poll({key: proc.pid for key, (proc, _, _) in running.items()}, len(pending))
            for key, (proc, log, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                log.seek(0)
                lines = log.read().decode(errors="replace").strip().splitlines()
                log.close()
                on_done(Done(key, proc.returncode, time.perf_counter() - started, lines[-1] if lines else ""))
    finally:
        for proc, log, _ in running.values():
            proc.kill()
            proc.wait()
            log.close()
