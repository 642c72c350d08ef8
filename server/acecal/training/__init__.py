"""Training and fine-tuning engine (``acecal train``), evaluation (``acecal evaluate``) and post-hoc calibration of a
trained bundle (``acecal calibrate``: :mod:`.calibrate`, with the model-space cases of :mod:`.calibration_cases`).

Import the submodules (torch and MONAI are needed): ``from acecal.training.engine import Engine``,
``from acecal.training.config import TrainConfig``, ``from acecal.training.evaluate import evaluate``.
The names below are also available from this package, imported on first use (importing the package stays cheap).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Engine": "acecal.training.engine",
    "TrainResult": "acecal.training.engine",
    "train": "acecal.training.engine",
    "TrainConfig": "acecal.training.config",
    "finetune": "acecal.training.finetune",
    "evaluate": "acecal.training.evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = list(_LAZY)
