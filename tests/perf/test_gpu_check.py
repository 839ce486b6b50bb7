"""usae.perf.gpu_check: the one command for a lent GPU, dry-run on CPU (Triton interpreted) so it cannot rot."""

import json
import os
import subprocess
import sys

import pytest

from usae import cli
from usae.perf.gpu_check import gpu_check


def test_the_dry_run_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    # a fresh interpreter: TRITON_INTERPRET must be set before triton is imported
    env = {**os.environ, "TRITON_INTERPRET": "1", "USAE_RUNS": str(tmp_path / "runs")}
    done = subprocess.run([sys.executable, "-m", "usae.cli", "bench", "--gpu-check", "--dry-run", "--device", "cpu",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all parts that ran passed" in done.stdout
    record = json.loads(out.read_text())
    checks = {c["name"]: c for c in record["checks"]}
    assert list(checks) == ["kernels", "trainer", "bf16", "step", "peers", "sweep"]
    assert record["dry_run"] is True and record["ok"] is True and record["device"] == "cpu"
    if checks["kernels"]["passed"] is None:
        pytest.skip(f"Triton is not importable here: {checks['kernels']['detail']}")
    assert checks["kernels"]["passed"] and checks["kernels"]["detail"]["worst"] < 1e-4
    assert checks["trainer"]["passed"] and checks["trainer"]["detail"]["loss error"] < 1e-4
    assert checks["bf16"]["passed"] is None and "CUDA only" in checks["bf16"]["detail"]["skipped"]
    assert all(checks[n]["passed"] and checks[n]["detail"]["rows"] > 0 for n in ("step", "peers", "sweep"))
    entries = {r["entry"] for r in record["rows"]}
    assert entries == {"step", "peers"}
    assert not list(tmp_path.glob("*.tmp"))


def test_it_refuses_to_time_cpu_as_a_gpu_and_stops_at_its_budget(tmp_path, capsys):
    with pytest.raises(ValueError, match="expected a CUDA device"):
        gpu_check("cpu")
    assert cli.main(["bench", "--dry-run"]) == 1
    assert "only valid with --gpu-check" in capsys.readouterr().err
    assert cli.main(["bench", "--gpu-check", "step"]) == 1
    report = gpu_check("cpu", dry_run=True, out=tmp_path / "r.json", budget_s=0.0, progress=None)
    skipped = {c.name: c.detail.get("skipped", "") for c in report.checks if c.passed is None}
    assert {"step", "peers", "sweep"} <= set(skipped) and "budget" in skipped["sweep"]
    assert report.ok and json.loads((tmp_path / "r.json").read_text())["ok"] is True
