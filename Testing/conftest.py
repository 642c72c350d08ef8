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


def train_tiny_bundle(
    root,
    *,
    num_classes: int = 2,
    model_id: str = "tiny-sphere",
    epochs=None,
    n_cases: int = 10,
    val_fraction: float = 0.2,
    **overrides,
):
    """Train a tiny SegResNet with the real engine on synthetic spheres under ``root``; return the bundle folder.

    ``root/data`` holds the dataset (MSD layout), ``root/models/<model_id>`` the bundle, ``root/work`` the run.
    Default epochs: 12 for 2 classes (~10 s, validation Dice ~0.97), 30 for 3 classes (~25 s, Dice ~0.98).
    """
    if epochs is None:
        epochs = 12 if num_classes == 2 else 30
    from synthetic import make_dataset

    from acecal.bundles import NetworkConfig
    from acecal.training.config import TrainConfig
    from acecal.training.engine import Engine

    root = _Path(root)
    data = make_dataset(root / "data", n_cases, layout="msd", num_classes=num_classes, shape_zyx=(24, 24, 24))
    settings = dict(
        data=str(data),
        network=NetworkConfig(name="SegResNet", args={"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}),
        roi_size=(24, 24, 24),
        epochs=epochs,
        batch_size=2,
        num_samples=1,
        lr=1e-2,
        warmup_epochs=1,
        val_fraction=val_fraction,
        val_every=epochs,
        augment=False,
        out_dir=str(root / "models"),
        work_dir=str(root / "work"),
        model_id=model_id,
        sw_batch_size=1,
        description="tiny synthetic test model",
        data_licence="CC0 (synthetic)",
    )
    settings.update(overrides)
    result = Engine(TrainConfig(**settings), show_progress=False).run()
    assert result.status == "published", result
    return result.bundle_path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Folder of a tiny trained 2-class bundle (labels {"0": "background", "1": "sphere"}), id "tiny-sphere".

    Its parent folder is a models directory (``ModelRegistry([path.parent])`` lists it). It segments the bright
    spheres of ``synthetic.make_case`` with Dice > 0.9. Trained once per session with the real engine (~10 s).
    """
    return train_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"))
