"""A run's work directory: the checkpoints, their names, and the random state that makes a resume bit-identical.

::

    <work dir>/
      last.pt            LAST: after every epoch (model, optimizer, scheduler, AMP scaler, RNG states, epoch,
                         history, best, the result-affecting settings, the split)
      best.pt            BEST: the weights of the best validated epoch so far (model, epoch, metrics)
      train_config.json  CONFIG_SNAPSHOT: the run's settings as last started
      train.jsonl        LOG_NAME: the progress log (:mod:`acecal.training.progress`) unless another is given

Every checkpoint goes through :func:`acecal.storage.files.atomic_write` (temporary sibling, ``fsync``, rename), so a
crash or Ctrl-C never leaves a torn one. Only rank 0 writes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from acecal.errors import InvalidInputError
from acecal.storage.files import atomic_write

__all__ = [
    "BEST",
    "CONFIG_SNAPSHOT",
    "LAST",
    "LOG_NAME",
    "ResumeError",
    "epoch_seed",
    "load_checkpoint",
    "resumable_state",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

LAST = "last.pt"
BEST = "best.pt"
CONFIG_SNAPSHOT = "train_config.json"
LOG_NAME = "train.jsonl"


class ResumeError(InvalidInputError):
    """The work directory holds a run that this one cannot continue (or must not overwrite)."""

    code = "resume_error"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` of ``state`` to ``path``, atomically and durably."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint this project wrote, on the CPU (``weights_only=False``: it holds RNG states and Python records;
    only the run's own work directory is read this way, never an uploaded file)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def resumable_state(work_dir: Path, settings: dict[str, Any], *, resume: bool) -> Optional[dict[str, Any]]:
    """The ``last.pt`` state to continue from, or None for a fresh run.

    Args:
        settings: the run's result-affecting settings (``TrainConfig.result_affecting()``), compared with the ones
            the checkpoint was written under.
        resume: continue an interrupted run; without it a work directory that already holds one is refused.

    Raises:
        ResumeError: a setting differs from the interrupted run's, or there is a run and ``resume`` is False.
    """
    last = work_dir / LAST
    if not last.is_file():
        return None
    if not resume:
        raise ResumeError(f"{work_dir} already holds a run ({LAST}); pass --resume to continue it, or another --id")
    state = load_checkpoint(last)
    saved = state.get("config", {})
    diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k) and k != "model_id")
    if diff:
        raise ResumeError(
            f"cannot resume {work_dir}: these settings differ from the interrupted run: {', '.join(diff)}"
        )
    return state


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank: an epoch's batches do not depend on what ran before it."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank]).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    """The torch, numpy, Python (and CUDA) random states."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore :func:`rng_state`; a CUDA state that does not fit this machine's GPUs is skipped."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception:  # noqa: BLE001 - different GPU count on resume: not fatal
            pass
