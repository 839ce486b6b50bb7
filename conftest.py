"""pytest setup shared by the unit tests and the chapters (run by nbval).

Chapters run at the ``smoke`` preset into a temporary artifact cache unless the caller set ``USAE_PRESET`` /
``USAE_RUNS``; notebook kernels started by nbval inherit this environment.
"""

import os
import tempfile

os.environ.setdefault("USAE_PRESET", "smoke")
if "USAE_RUNS" not in os.environ:
    os.environ["USAE_RUNS"] = tempfile.mkdtemp(prefix="usae-test-runs-")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no OpenMP spin-waiting
