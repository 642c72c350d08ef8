"""Stored evaluation reports: ``<data_dir>/evaluations/<evaluation_id>/``.

Each folder holds ``evaluation.json`` (the reply of ``POST /evaluate/{model_id}``) and the reliability figures
(PNG). A report is built in a hidden ``.tmp-<id>`` sibling and renamed into place
(:func:`acecal.storage.files.atomic_folder`), so a reader never sees half of one; the half-built ones a stopped
server left behind are removed at the next start (:meth:`EvaluationStore.clean`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from acecal.errors import NotFoundError
from acecal.storage.db import new_id
from acecal.storage.files import atomic_folder, storage_guard

__all__ = ["EVALUATIONS_DIR", "REPLY", "EvaluationStore", "evaluation_not_found"]

EVALUATIONS_DIR = "evaluations"
REPLY = "evaluation.json"
_EV_ID = re.compile(r"^ev_[0-9a-f]{12}$")
_PNG = re.compile(r"^[A-Za-z0-9._-]{1,200}\.png$")


def evaluation_not_found(ev_id: str) -> NotFoundError:
    return NotFoundError(f"unknown evaluation {ev_id!r}", code="evaluation_not_found")


class EvaluationStore:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / EVALUATIONS_DIR

    def clean(self) -> None:
        """Create the folder and remove half-written evaluations of a previous run (nothing is writing at start)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def create(self, build: Callable[[str, Path], dict[str, Any]]) -> dict[str, Any]:
        """A new evaluation: ``build(evaluation_id, folder)`` writes the figures into ``folder`` and returns the reply,
        stored as ``evaluation.json``; returns the reply. Disk errors become :class:`~acecal.errors.StorageError`."""
        ev_id = new_id("ev")
        with storage_guard("the evaluation report"), atomic_folder(self.root / ev_id, tmp_name=f".tmp-{ev_id}") as tmp:
            reply = build(ev_id, tmp)
            (tmp / REPLY).write_text(json.dumps(reply, indent=1, allow_nan=False))
        return reply

    def folder(self, ev_id: str) -> Path:
        """The folder of a stored evaluation (404 ``evaluation_not_found`` when there is none)."""
        if not isinstance(ev_id, str) or not _EV_ID.match(ev_id):
            raise evaluation_not_found(ev_id)
        d = self.root / ev_id
        if not (d / REPLY).is_file():
            raise evaluation_not_found(ev_id)
        return d

    def get(self, ev_id: str) -> dict[str, Any]:
        return json.loads((self.folder(ev_id) / REPLY).read_text())

    def figure(self, ev_id: str, name: str) -> Path:
        """The path of one of the evaluation's PNG figures (404 ``figure_not_found``)."""
        d = self.folder(ev_id)
        if _PNG.match(name):
            for p in (d / "figures" / name, d / name):
                if p.is_file():
                    return p
        raise NotFoundError(f"evaluation {ev_id!r} has no figure {name!r}", code="figure_not_found")

    def delete(self, ev_id: str) -> None:
        shutil.rmtree(self.folder(ev_id), ignore_errors=True)
