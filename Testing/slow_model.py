"""Copies of the tiny trained bundle under other ids: a second model for the default-model tests, and a slow one whose
inference lasts minutes, for the tests that stop an inference half-way.

Both are real bundles (the tiny bundle's weights, a ``bundle.json`` with another id and sliding-window settings):
the server loads and runs them like any other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from synthetic import make_case, write_case

#: the slow copy's sliding window: a 24^3 window every voxel (overlap 0.95 -> stride 1), one window per batch, so a
#: 48^3 volume is 25^3 = 15625 network calls (minutes on a CPU) and a cancel is seen within one window's time
SLOW_OVERLAP, SLOW_BATCH = 0.95, 1


def copy_bundle(bundle: Path, models_dir: Path, model_id: str, **config) -> Path:
    """``bundle`` copied to ``models_dir/model_id`` with id ``model_id`` and ``config`` keys replaced."""
    dest = Path(models_dir) / model_id
    shutil.copytree(bundle, dest)
    cfg = json.loads((dest / "bundle.json").read_text())
    cfg.update(id=model_id, **config)
    (dest / "bundle.json").write_text(json.dumps(cfg, indent=2))
    return dest


def slow_bundle(bundle: Path, models_dir: Path, model_id: str = "tiny-slow") -> Path:
    """The tiny bundle made slow by its sliding window alone (same network, same weights)."""
    return copy_bundle(bundle, models_dir, model_id, sw_overlap=SLOW_OVERLAP, sw_batch_size=SLOW_BATCH, tta="none")


def slow_volume(path: Path) -> Path:
    """A 48^3 synthetic volume (what the slow bundle needs minutes for), written to ``path``."""
    write_case(make_case((48, 48, 48), seed=41), path)
    return path
