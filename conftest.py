"""Test-session settings shared by the unit tests and the notebooks that nbval executes.

Notebooks run in smoke mode (tiny budgets) against generated fixtures in the real formats, never
against real data; figures go to a temporary folder; progress bars are off.
"""
import os
import sys
import tempfile
from pathlib import Path

# One thread per process: pytest-xdist runs two workers on two cores, and notebook kernels inherit
# this; more threads than cores makes small torch ops tens of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent / "tests"))
from fixtures import make_data_root  # noqa: E402

_session_dir = Path(tempfile.mkdtemp(prefix="ddlib-tests-"))
os.environ["DDLIB_SMOKE"] = "1"
os.environ["DDLIB_PROGRESS"] = "0"
os.environ["MPLBACKEND"] = "Agg"
os.environ["DDLIB_CACHE"] = str(_session_dir / "cache")
os.environ["DDLIB_DATA"] = str(make_data_root(_session_dir / "data"))
# Notebook kernels (nbval's above all) must never write into the repository's runs table; tests that
# check recording point DDLIB_RESULTS at a temporary file.
os.environ["DDLIB_RESULTS"] = "off"
