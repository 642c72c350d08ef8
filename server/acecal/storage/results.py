"""Inference results on disk, with expiry.

Each result is a folder ``<data_dir>/results/<result_id>/`` holding ``result.json`` (the reply of ``POST /infer``)
and the four NRRD volumes. A result is written into a hidden sibling folder and renamed into place
(:func:`acecal.storage.files.atomic_folder`), so a reader never sees half of one. Results expire ``ttl_s`` seconds
after they were made (default one hour, ``ACECAL_RESULT_TTL_S``): an expired result answers 404 and a periodic sweep
deletes it; ``DELETE /results/{id}`` removes one at once. Results survive a server restart until they expire.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from acecal.errors import ResultNotFoundError
from acecal.storage.files import atomic_folder, storage_guard

__all__ = ["EXPIRY_NAME", "RESULT_JSON", "ResultStore"]

RESULT_JSON = "result.json"
EXPIRY_NAME = "expires"
_ID = re.compile(r"^[0-9a-f]{32}$")
#: the report key ``write`` returns with the names of the volumes it wrote (not part of the stored reply)
VOLUMES_KEY = "_volumes"


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


class ResultStore:
    def __init__(self, root: Path, ttl_s: float):
        self.root = Path(root)
        self.ttl_s = float(ttl_s)
        self.root.mkdir(parents=True, exist_ok=True)

    # --- writing ------------------------------------------------------------------------------------------------
    def create(self, write: Callable[[Path], dict[str, Any]], url_prefix: str = "") -> dict[str, Any]:
        """Make a new result: ``write(folder)`` writes the volumes and returns the report, with the written volumes'
        names under ``"_volumes"``; returns the stored reply.

        The reply adds ``result_id``, ``files`` (URL paths), ``created``, ``expires_at`` and ``expires_in_s``.
        """
        rid = uuid.uuid4().hex
        with storage_guard("the inference result"), atomic_folder(self.root / rid) as tmp:
            report = write(tmp)
            now = time.time()
            reply = {
                "result_id": rid,
                **report,
                "files": {name: f"{url_prefix}/results/{rid}/files/{name}" for name in report.pop(VOLUMES_KEY)},
                "created": _iso(now),
                "expires_at": _iso(now + self.ttl_s),
                "expires_in_s": self.ttl_s,
                "_expires_epoch": now + self.ttl_s,
            }
            # allow_nan=False: a NaN would make the stored reply unreadable as JSON; refused here, never stored
            (tmp / RESULT_JSON).write_text(json.dumps(reply, allow_nan=False))
            (tmp / EXPIRY_NAME).write_text(repr(now + self.ttl_s))  # checked on every file GET: tiny
        return self._public(reply)

    # --- reading ------------------------------------------------------------------------------------------------
    def _dir(self, rid: str) -> Path:
        if not isinstance(rid, str) or not _ID.match(rid):
            raise ResultNotFoundError(f"unknown result id {rid!r}: results have 32-character hexadecimal ids")
        return self.root / rid

    def _unknown(self, rid: str) -> ResultNotFoundError:
        return ResultNotFoundError(
            f"unknown result id {rid!r}; it may have expired or been deleted (results are kept {self.ttl_s:g} s)"
        )

    def _expired(self, rid: str, folder: Path) -> ResultNotFoundError:
        shutil.rmtree(folder, ignore_errors=True)
        return ResultNotFoundError(f"result {rid!r} has expired (results are kept {self.ttl_s:g} s)")

    def _load(self, rid: str) -> dict[str, Any]:
        d = self._dir(rid)
        try:
            reply = json.loads((d / RESULT_JSON).read_text())
        except (OSError, ValueError):
            raise self._unknown(rid) from None
        if reply.get("_expires_epoch", 0) <= time.time():
            raise self._expired(rid, d)
        return reply

    @staticmethod
    def _public(reply: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in reply.items() if not k.startswith("_")}
        if "expires_in_s" in out and "_expires_epoch" in reply:
            out["expires_in_s"] = max(0.0, round(reply["_expires_epoch"] - time.time(), 1))
        return out

    def get(self, rid: str) -> dict[str, Any]:
        return self._public(self._load(rid))

    def _check_alive(self, rid: str) -> Path:
        """The result's folder if it exists and has not expired (without parsing the reply)."""
        d = self._dir(rid)
        try:
            expires = float((d / EXPIRY_NAME).read_text())
        except (OSError, ValueError):
            raise self._unknown(rid) from None
        if expires <= time.time():
            raise self._expired(rid, d)
        return d

    def file(self, rid: str, name: str, filename: str) -> Path:
        """The path of the result's volume ``name`` (stored as ``filename``)."""
        p = self._check_alive(rid) / filename
        if not p.is_file():
            raise ResultNotFoundError(f"result {rid!r} has no {name} volume")
        return p

    def delete(self, rid: str) -> None:
        d = self._dir(rid)
        if not d.is_dir():
            raise ResultNotFoundError(f"unknown result id {rid!r}; it may have expired or been deleted")
        shutil.rmtree(d, ignore_errors=True)

    def discard(self, rid: str) -> None:
        """Delete a result if it exists (a reply that could not be sent leaves nothing behind)."""
        if isinstance(rid, str) and _ID.match(rid):
            shutil.rmtree(self.root / rid, ignore_errors=True)

    # --- housekeeping -------------------------------------------------------------------------------------------
    def sweep(self, now: Optional[float] = None, *, partial_older_than_s: float = 3600.0) -> int:
        """Delete expired results and half-written ones older than ``partial_older_than_s`` (0 at start-up, when
        nothing can be writing); returns how many folders went."""
        now = time.time() if now is None else now
        removed = 0
        for d in list(self.root.iterdir()) if self.root.is_dir() else []:
            if not d.is_dir():
                continue
            if d.name.startswith("."):
                try:
                    stale = d.stat().st_mtime <= now - partial_older_than_s
                except OSError:
                    continue
                if stale:
                    shutil.rmtree(d, ignore_errors=True)
                    removed += 1
                continue
            try:
                exp = float((d / EXPIRY_NAME).read_text())
            except (OSError, ValueError):
                exp = 0.0
            if exp <= now:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def count(self) -> int:
        return (
            sum(1 for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
            if self.root.is_dir()
            else 0
        )
