"""usae._workers: function calls in fresh processes, a bounded number at a time."""

from __future__ import annotations

import os
import time

import pytest

from usae._workers import Call, Done, run_calls

WORKER = '''
import os, sys, time

def write(path, text, seconds="0"):
    time.sleep(float(seconds))
    with open(path, "w") as f:
        f.write(text + " " + str(os.getpid()) + " " + os.environ.get("MARK", ""))

def fail(message):
    print("first line", file=sys.stderr)
    print(message, file=sys.stderr)
    sys.exit(3)
'''


@pytest.fixture
def worker_dir(tmp_path):
    (tmp_path / "tworker.py").write_text(WORKER)
    return tmp_path


def test_every_call_runs_once_with_env_and_cwd(worker_dir):
    done: list[Done] = []
    calls = [Call(i, "tworker", "write", (str(worker_dir / f"out{i}"), f"call{i}")) for i in range(4)]
    run_calls(calls, 2, {**os.environ, "MARK": "yes"}, done.append, cwd=worker_dir)
    assert sorted(d.key for d in done) == [0, 1, 2, 3] and all(d.ok and d.returncode == 0 for d in done)
    texts = [(worker_dir / f"out{i}").read_text().split() for i in range(4)]
    assert [t[0] for t in texts] == [f"call{i}" for i in range(4)]
    assert all(t[2] == "yes" for t in texts) and len({t[1] for t in texts}) == 4   # own process each
    assert all(d.seconds > 0 for d in done)


def test_at_most_slots_run_at_once(worker_dir):
    seen: list[int] = []
    calls = [Call(i, "tworker", "write", (str(worker_dir / f"o{i}"), "x", "0.6")) for i in range(3)]
    run_calls(calls, 2, dict(os.environ), lambda d: None, cwd=worker_dir,
              on_poll=lambda pids, n_pending: seen.append(len(pids)))
    assert max(seen) == 2


def test_a_failure_reports_its_last_stderr_line(worker_dir):
    done: list[Done] = []
    run_calls([Call("bad", "tworker", "fail", ("the reason",))], 1, dict(os.environ), done.append, cwd=worker_dir)
    (d,) = done
    assert not d.ok and d.returncode == 3 and d.last_error_line == "the reason" and d.reason() == "the reason"


def test_an_exception_in_on_done_kills_the_others(worker_dir):
    calls = [Call("quick", "tworker", "write", (str(worker_dir / "q"), "x")),
             Call("slow", "tworker", "write", (str(worker_dir / "s"), "x", "30"))]

    def on_done(d: Done) -> None:
        raise RuntimeError(f"stop after {d.key}")

    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="stop after quick"):
        run_calls(calls, 2, dict(os.environ), on_done, cwd=worker_dir)
    assert time.perf_counter() - started < 20 and not (worker_dir / "s").exists()


def test_bad_slots_is_rejected():
    with pytest.raises(ValueError, match="slots = 0"):
        run_calls([], 0, {}, lambda d: None)
