"""Suite-wide settings: deterministic, single-threaded torch so the suite behaves the same on a 2-core CI machine."""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Never touch the user's ~/.acecal: runs, models and state written with default paths go to a throw-away folder.
os.environ["ACECAL_DATA_DIR"] = tempfile.mkdtemp(prefix="acecal-test-data-")

try:  # the client tests must also run where torch is absent
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


# --- training: synthetic data helpers + a tiny trained bundle (Testing/synthetic.py) -----------------------------
import sys as _sys
from pathlib import Path as _Path

import pytest

_TESTING = str(_Path(__file__).resolve().parent)
if _TESTING not in _sys.path:  # lets tests `import synthetic` under --import-mode=importlib
    _sys.path.insert(0, _TESTING)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Folder of a tiny trained 2-class bundle (labels {"0": "background", "1": "sphere"}), id "tiny-sphere".

    Its parent folder is a models directory (``ModelRegistry([path.parent])`` lists it). It segments the bright
    spheres of ``synthetic.make_case`` with Dice > 0.9. Trained once per session with the real engine (~10 s).
    """
    from tiny_training import train_tiny_bundle  # trains with torch: the client tests must run without it

    return train_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"))
