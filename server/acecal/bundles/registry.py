"""The one model registry: every bundle under the shipped ``models/`` folder and under the user's data directory.

Bundles are self-describing and published by atomic rename, so the folders themselves are the source of truth: the
registry rescans when a folder's modification time changes, so a newly published fine-tuned model appears at once,
without a restart. Ids are unique; a shipped bundle wins over a user bundle with the same id (and the clash is
reported by :meth:`ModelRegistry.problems`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable, List, Optional

from acecal.bundles.bundle import CONFIG_NAME, Bundle
from acecal.errors import BundleError, ModelNotFoundError


class ModelRegistry:
    def __init__(self, search_dirs: Iterable[str | os.PathLike]):
        self.search_dirs = [Path(d) for d in search_dirs]
        self._lock = threading.Lock()
        self._stamp: Optional[tuple] = None
        self._bundles: dict[str, Bundle] = {}
        self._problems: list[str] = []

    def _current_stamp(self) -> tuple:
        stamp: List[tuple[str, Optional[int]]] = []
        for d in self.search_dirs:
            try:
                stamp.append((str(d), d.stat().st_mtime_ns))
            except FileNotFoundError:
                stamp.append((str(d), None))
        return tuple(stamp)

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            stamp = self._current_stamp()
            if not force and stamp == self._stamp:
                return
            bundles: dict[str, Bundle] = {}
            problems: list[str] = []
            for d in self.search_dirs:
                if not d.is_dir():
                    continue
                for sub in sorted(d.iterdir()):
                    if sub.name.startswith(".") or not (sub / CONFIG_NAME).is_file():
                        continue
                    try:
                        b = Bundle.load(sub)
                    except BundleError as e:
                        problems.append(str(e))
                        continue
                    if b.id in bundles:
                        problems.append(f"duplicate model id {b.id!r}: {sub} ignored, {bundles[b.id].path} kept")
                        continue
                    bundles[b.id] = b
            self._bundles, self._problems, self._stamp = bundles, problems, stamp

    def list(self) -> list[Bundle]:
        self.refresh()
        return list(self._bundles.values())

    # List, not list, from here on: the method `list` shadows the builtin in the class body
    def ids(self) -> List[str]:
        return [b.id for b in self.list()]

    def get(self, model_id: str) -> Bundle:
        self.refresh()
        b = self._bundles.get(model_id)
        if b is None:
            self.refresh(force=True)  # a bundle published within the same mtime tick
            b = self._bundles.get(model_id)
        if b is None:
            known = ", ".join(sorted(self._bundles)) or "none"
            raise ModelNotFoundError(f"unknown model {model_id!r}; available models: {known}")
        return b

    def problems(self) -> List[str]:
        self.refresh()
        return list(self._problems)


def resolve_bundle(model: str | os.PathLike, registry: Optional[ModelRegistry] = None) -> Bundle:
    """A bundle from a folder path or, failing that, an id in ``registry`` (default: the shipped models)."""
    p = Path(model)
    if (p / CONFIG_NAME).is_file():
        return Bundle.load(p)
    reg = registry or ModelRegistry([default_models_dir()])
    return reg.get(str(model))


def default_models_dir() -> Path:
    """The shipped ``models/`` folder: ``ACECAL_MODELS_DIR`` or the repository's ``models/`` next to ``server/``."""
    env = os.environ.get("ACECAL_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "models"


def default_data_dir() -> Path:
    """The user's data directory: ``ACECAL_DATA_DIR`` or ``~/.acecal``."""
    return Path(os.environ.get("ACECAL_DATA_DIR", Path.home() / ".acecal"))
