"""Fine-tuning: start from any bundle (id or folder), optionally freeze the encoder, publish a new bundle.

The new bundle inherits the base's network, labels, model space (orientation, spacing, normalisation) and sliding
window, gets a new id, ``parent`` = the base's id and its own card with the new validation metrics. The base bundle
is never modified.

In-process use (``progress`` receives the engine's events, ``cancel`` is a ``threading.Event`` or a callable)::

    result = finetune("hippocampus-softace", data="my_cases/", freeze_encoder=True, epochs=20,
                      out_dir=Path.home() / "my-models", progress=print, cancel=stop_event)

The server's fine-tuning jobs take their settings from :func:`finetune_config` (``acecal.jobs.service``) and run the
same :class:`~acecal.training.engine.Engine` in a job process (``acecal.jobs.worker``).
"""

from __future__ import annotations

from typing import Any, Optional

from acecal.bundles import ModelRegistry
from acecal.training.config import TrainConfig
from acecal.training.engine import Engine, TrainResult
from acecal.training.progress import CancelToken, ProgressCallback

#: defaults that suit fine-tuning a trained model on a small dataset (override any of them)
FINETUNE_DEFAULTS: dict[str, Any] = {"epochs": 20, "lr": 5e-5, "warmup_epochs": 1, "val_every": 2}


def finetune_config(base: str, *, freeze_encoder: bool = False, **settings: Any) -> TrainConfig:
    """A :class:`TrainConfig` for fine-tuning ``base`` (bundle id or folder); ``settings`` override the defaults."""
    merged = {**FINETUNE_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    return TrainConfig(base=str(base), freeze_encoder=freeze_encoder, **merged)


def finetune(
    base: str,
    *,
    freeze_encoder: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelToken = None,
    show_progress: Optional[bool] = False,
    registry: Optional[ModelRegistry] = None,
    **settings: Any,
) -> TrainResult:
    """Fine-tune ``base`` on the data in ``settings`` (``data=`` or ``images=`` + ``labels_dir=``) and publish."""
    cfg = finetune_config(base, freeze_encoder=freeze_encoder, **settings)
    return Engine(cfg, progress=progress, cancel=cancel, show_progress=show_progress, registry=registry).run()
