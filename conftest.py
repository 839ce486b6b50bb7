"""pytest setup shared by the unit tests and the chapters (run by nbval).

Chapters run at the ``smoke`` preset into a temporary artifact cache unless the caller set ``USAE_PRESET`` /
``USAE_RUNS``; notebook kernels started by nbval inherit this environment. The temporary cache is removed when
the session ends.
"""

import os
import shutil
import tempfile

os.environ.setdefault("USAE_PRESET", "smoke")
_OWN_RUNS = None
if "USAE_RUNS" not in os.environ:
    _OWN_RUNS = os.environ["USAE_RUNS"] = tempfile.mkdtemp(prefix="usae-test-runs-")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no OpenMP spin-waiting


def pytest_sessionfinish(session, exitstatus):
    """Remove the temporary artifact cache this session created (a caller's USAE_RUNS is left alone)."""
    if _OWN_RUNS is not None:
        shutil.rmtree(_OWN_RUNS, ignore_errors=True)


# the longest files first: under pytest-xdist (`make test`) a file runs on one worker, and a long file that starts
# last keeps one worker busy alone at the end (the smoke book build takes minutes)
_LONGEST_FIRST = ("test_book.py", "test_claims.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order
