"""The server's durable state: one embedded SQLite database, ``<data_dir>/acecal.db``.

It holds the datasets, their cases, the fine-tuning jobs and an index of the models those jobs published (the model
folders themselves stay the registry's source of truth, see :class:`acecal.bundles.ModelRegistry`). Files (case
volumes, checkpoints, bundles, evaluation reports) live beside it under the data directory; the database stores
their paths relative to the data directory, so the whole directory can be moved.

Crash safety (SIGKILL at any moment loses nothing that was acknowledged):

- WAL journal with ``synchronous=FULL``: a committed transaction is on disk when ``COMMIT`` returns.
- Writers put a file in place first (written to a temporary name, ``fsync``, ``rename``, ``fsync`` of the folder;
  :func:`durable_move`), then commit the row that refers to it, then answer the request. A crash between the two
  leaves an orphan file that the next start removes (:meth:`acecal.api.datastore.DatasetStore.reconcile`), never a
  row pointing at nothing.
- Every write is one ``BEGIN IMMEDIATE`` transaction under one lock (one connection shared by the threads of the
  server process; the job processes never open the database, they write files the server reads).
- The schema is versioned (``PRAGMA user_version``); a database written by a newer server is refused with a clear
  message instead of being misread.
- "Database or disk is full" and permission errors become :class:`acecal.errors.StorageError` (507): the request
  fails, the server keeps running.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

from acecal.api.jobproc import dumps_finite
from acecal.errors import StorageError

DB_NAME = "acecal.db"
SCHEMA_VERSION = 1

#: job states; the last three are final
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS datasets (
    id       TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    model    TEXT,                 -- model whose labels every case must use (optional)
    created  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cases (
    id          TEXT PRIMARY KEY,
    dataset_id  TEXT NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,     -- the user's name for the case (display only)
    image       TEXT NOT NULL,     -- path relative to the data directory (server-chosen file name)
    label       TEXT NOT NULL,
    info        TEXT NOT NULL,     -- JSON: size, spacing, label_values, bytes
    created     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_by_dataset ON cases(dataset_id);
CREATE TABLE IF NOT EXISTS jobs (
    id                TEXT PRIMARY KEY,
    kind              TEXT NOT NULL DEFAULT 'finetune',
    status            TEXT NOT NULL,
    request           TEXT NOT NULL,   -- JSON: the request as accepted (defaults filled in)
    config            TEXT NOT NULL,   -- JSON: the TrainConfig the job process runs
    base_model        TEXT,
    dataset_id        TEXT,
    model_id          TEXT,            -- the id the new bundle gets (reserved at submission)
    published         INTEGER NOT NULL DEFAULT 0,
    epochs            INTEGER NOT NULL,
    epoch             INTEGER NOT NULL DEFAULT 0,
    step              INTEGER,
    steps             INTEGER,
    metrics           TEXT NOT NULL DEFAULT '[]',   -- JSON: one entry per finished epoch
    final_metrics     TEXT,                         -- JSON: validation metrics of the published weights
    error             TEXT,
    pid               INTEGER,
    pid_started       REAL,            -- the job process's start time (a reused pid is not the job's)
    attempts          INTEGER NOT NULL DEFAULT 0,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    created           TEXT NOT NULL,
    started           TEXT,
    finished          TEXT,
    rev               INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status);
CREATE TABLE IF NOT EXISTS models (
    id          TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    job_id      TEXT,
    parent      TEXT,
    dataset_id  TEXT,
    created     TEXT NOT NULL
);
"""


#: columns added to ``jobs`` after the first version-1 databases were written (added in place when missing)
_ADDED_JOB_COLUMNS = (("final_metrics", "TEXT"), ("pid_started", "REAL"))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- durable files ---------------------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """``fsync`` a file or a folder (a folder's entry list: makes a rename inside it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(str(path), flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_move(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` (same file system) so that after a crash either nothing or the whole file is there."""
    fsync_path(src)
    os.replace(src, dst)
    fsync_path(dst.parent)


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EIO)


def is_disk_error(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        return True
    text = str(e).lower()
    return isinstance(e, sqlite3.Error) and any(s in text for s in ("disk is full", "readonly", "disk i/o",
                                                                    "unable to open"))


def storage_error(e: BaseException, what: str) -> StorageError:
    reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
    return StorageError(f"cannot write {what}: {reason}; free disk space or fix the data directory's permissions")


# --- the database ----------------------------------------------------------------------------------------------------
def _row(cur: sqlite3.Cursor, row: tuple) -> dict:
    return {d[0]: v for d, v in zip(cur.description, row)}


class StateDB:
    """The database. Thread-safe: one connection, one lock; every write is one transaction."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self._lock = threading.RLock()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                         check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise storage_error(e, f"the state database {self.path}") from None
        self._conn.row_factory = _row
        c = self._conn
        c.execute("PRAGMA busy_timeout=30000")
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode and list(mode.values())[0].lower() != "wal":  # pragma: no cover - e.g. a network file system
            c.execute("PRAGMA journal_mode=DELETE")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = list(self._conn.execute("PRAGMA user_version").fetchone().values())[0]
            if version > SCHEMA_VERSION:
                raise StorageError(f"the state database {self.path} was written by a newer ACECal server (schema "
                                   f"{version}, this server knows {SCHEMA_VERSION}); upgrade acecal")
            with self.tx() as c:
                # statement by statement (executescript() would commit the open transaction); IF NOT EXISTS: the
                # same statements bring an older version-1 database up to date
                for stmt in (s.strip() for s in _SCHEMA_V1.split(";")):
                    if stmt:
                        c.execute(stmt)
                have = {r["name"] for r in c.execute("PRAGMA table_info(jobs)").fetchall()}
                for col, decl in _ADDED_JOB_COLUMNS:
                    if col not in have:
                        c.execute(f"ALTER TABLE jobs ADD COLUMN {col} {decl}")
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``); durable when the block returns."""
        with self._lock:
            c = self._conn
            try:
                c.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                if is_disk_error(e):
                    raise storage_error(e, "the state database") from None
                raise
            try:
                yield c
                c.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    c.execute("ROLLBACK")
                if is_disk_error(e):
                    raise storage_error(e, "the state database") from None
                raise

    def query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple = ()) -> Optional[dict]:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    # --- datasets and cases --------------------------------------------------------------------------------------
    def add_dataset(self, ds_id: str, name: str, model: Optional[str]) -> dict:
        row = {"id": ds_id, "name": name, "model": model, "created": now_iso()}
        with self.tx() as c:
            c.execute("INSERT INTO datasets (id, name, model, created) VALUES (:id, :name, :model, :created)", row)
        return row

    def get_dataset(self, ds_id: str) -> Optional[dict]:
        return self.one("SELECT * FROM datasets WHERE id = ?", (ds_id,))

    def list_datasets(self) -> list[dict]:
        return self.query("SELECT d.*, (SELECT COUNT(*) FROM cases c WHERE c.dataset_id = d.id) AS num_cases "
                          "FROM datasets d ORDER BY d.rowid")

    def delete_dataset(self, ds_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM cases WHERE dataset_id = ?", (ds_id,))
            c.execute("DELETE FROM datasets WHERE id = ?", (ds_id,))

    def add_case(self, row: dict) -> dict:
        row = {**row, "info": dumps_finite(row["info"]), "created": row.get("created") or now_iso()}
        with self.tx() as c:
            c.execute("INSERT INTO cases (id, dataset_id, name, image, label, info, created) "
                      "VALUES (:id, :dataset_id, :name, :image, :label, :info, :created)", row)
        return self._case(dict(row))

    @staticmethod
    def _case(row: dict) -> dict:
        row["info"] = json.loads(row["info"]) if isinstance(row.get("info"), str) else row.get("info") or {}
        return row

    def list_cases(self, ds_id: str) -> list[dict]:
        return [self._case(r) for r in self.query("SELECT * FROM cases WHERE dataset_id = ? ORDER BY rowid",
                                                  (ds_id,))]

    def get_case(self, ds_id: str, case_id: str) -> Optional[dict]:
        r = self.one("SELECT * FROM cases WHERE dataset_id = ? AND id = ?", (ds_id, case_id))
        return self._case(r) if r else None

    def delete_case(self, ds_id: str, case_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM cases WHERE dataset_id = ? AND id = ?", (ds_id, case_id))

    def all_case_files(self) -> set[str]:
        out: set[str] = set()
        for r in self.query("SELECT image, label FROM cases"):
            out.update((r["image"], r["label"]))
        return out

    # --- jobs ----------------------------------------------------------------------------------------------------
    _JSON_FIELDS = ("request", "config", "metrics", "final_metrics")

    def _job(self, row: Optional[dict]) -> Optional[dict]:
        if row is None:
            return None
        for k in self._JSON_FIELDS:
            if isinstance(row.get(k), str):
                row[k] = json.loads(row[k])
        row["published"] = bool(row.get("published"))
        row["cancel_requested"] = bool(row.get("cancel_requested"))
        return row

    def add_job(self, row: dict) -> dict:
        row = dict(row)
        for k in self._JSON_FIELDS:
            row[k] = dumps_finite(row.get(k, [] if k == "metrics" else None if k == "final_metrics" else {}))
        row.setdefault("created", now_iso())
        cols = ", ".join(row)
        with self.tx() as c:
            c.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join(':' + k for k in row)})", row)
        return self.get_job(row["id"])  # type: ignore[return-value]

    def get_job(self, job_id: str) -> Optional[dict]:
        return self._job(self.one("SELECT * FROM jobs WHERE id = ?", (job_id,)))

    def list_jobs(self, status: Optional[str] = None, limit: int = 1000) -> list[dict]:
        if status:
            rows = self.query("SELECT * FROM jobs WHERE status = ? ORDER BY rowid DESC LIMIT ?", (status, limit))
        else:
            rows = self.query("SELECT * FROM jobs ORDER BY rowid DESC LIMIT ?", (limit,))
        return [self._job(r) for r in rows]  # type: ignore[misc]

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        marks = ", ".join("?" * len(statuses))
        return [self._job(r) for r in self.query(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY rowid",
                                                 statuses)]  # type: ignore[misc]

    def count_jobs(self, *statuses: str) -> int:
        marks = ", ".join("?" * len(statuses))
        r = self.one(f"SELECT COUNT(*) AS n FROM jobs WHERE status IN ({marks})", statuses)
        return int(r["n"]) if r else 0

    def update_job(self, job_id: str, *, only_if_status: Optional[tuple] = None, **fields: Any) -> bool:
        """Set ``fields`` (JSON fields serialised) and bump ``rev``; with ``only_if_status`` only from those states.
        Returns whether a row changed."""
        if not fields:
            return False
        vals = {k: (dumps_finite(v) if k in self._JSON_FIELDS else v) for k, v in fields.items()}
        sets = ", ".join(f"{k} = :{k}" for k in vals) + ", rev = rev + 1"
        sql = f"UPDATE jobs SET {sets} WHERE id = :_id"
        args = {**vals, "_id": job_id}
        if only_if_status:
            sql += " AND status IN (" + ", ".join(f":_s{i}" for i in range(len(only_if_status))) + ")"
            args.update({f"_s{i}": s for i, s in enumerate(only_if_status)})
        with self.tx() as c:
            return c.execute(sql, args).rowcount > 0

    def active_jobs_using(self, ds_id: str) -> list[dict]:
        return [self._job(r) for r in self.query(
            "SELECT * FROM jobs WHERE dataset_id = ? AND status IN ('queued', 'running') ORDER BY rowid",
            (ds_id,))]  # type: ignore[misc]

    def model_id_reserved(self, model_id: str) -> bool:
        return self.one("SELECT 1 AS x FROM jobs WHERE model_id = ? AND status IN ('queued', 'running')",
                        (model_id,)) is not None

    # --- models (index of published fine-tuned bundles) ----------------------------------------------------------
    def add_model(self, model_id: str, path: str, *, job_id: Optional[str], parent: Optional[str],
                  dataset_id: Optional[str]) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO models (id, path, job_id, parent, dataset_id, created) "
                      "VALUES (?, ?, ?, ?, ?, ?)", (model_id, path, job_id, parent, dataset_id, now_iso()))

    def get_model(self, model_id: str) -> Optional[dict]:
        return self.one("SELECT * FROM models WHERE id = ?", (model_id,))
