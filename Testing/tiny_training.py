"""A tiny SegResNet trained with the real engine on synthetic spheres: shared by the suite's fixtures and tests.

A module of its own (not conftest.py): several folders have a conftest, so ``from conftest import ...`` would pick
whichever was imported first.
"""

from pathlib import Path

from synthetic import make_dataset

from acecal.bundles import NetworkConfig
from acecal.training.config import TrainConfig
from acecal.training.engine import Engine

#: the tiny network's architecture (two levels, 8 filters): seconds per training on the CPU
TINY_NETWORK_ARGS = {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}


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
    root = Path(root)
    data = make_dataset(root / "data", n_cases, layout="msd", num_classes=num_classes, shape_zyx=(24, 24, 24))
    settings = dict(
        data=str(data),
        network=NetworkConfig(name="SegResNet", args=dict(TINY_NETWORK_ARGS)),
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
