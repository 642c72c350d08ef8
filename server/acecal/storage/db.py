"""The server's durable state: one embedded SQLite database, ``<data_dir>/acecal.db``.

It holds the datasets, their cases, the fine-tuning jobs and an index of the models those jobs published (the model
folders themselves stay the registry's source of truth, see :class:`acecal.bundles.ModelRegistry`). Files (case
volumes, checkpoints, bundles, evaluation reports) live beside it under the data directory; the database stores
their paths relative to the data directory, so the whole directory can be moved. Rows come back typed
(:class:`DatasetRow`, :class:`CaseRow`, :class:`JobRow`, :class:`ModelRow`).

Crash safety (SIGKILL at any moment loses nothing that was acknowledged):

- WAL journal with ``synchronous=FULL``: a committed transaction is on disk when ``COMMIT`` returns.
- Writers put a file in place first (:func:`acecal.storage.files.durable_move`), then commit the row that refers to
  it, then answer the request. A crash between the two leaves an orphan file that the next start removes
  (:meth:`acecal.storage.datasets.DatasetStore.reconcile`), never a row pointing at nothing.
- Every write is one ``BEGIN IMMEDIATE`` transaction under one lock (one connection shared by the threads of the
  server process; the job processes never open the database, they write files the server reads).
- The schema is versioned (``PRAGMA user_version`` = how many of :data:`MIGRATIONS` were applied, in order); a
  database written by a newer server is refused with a clear message instead of being misread.
- "Database or disk is full" and permission errors become :class:`acecal.errors.StorageError` (507): the request
  fails, the server keeps running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from acecal.errors import StorageError
from acecal.protocol import ACTIVE_JOB_STATUSES, JOB_QUEUED
from acecal.storage.files import dumps_finite, is_disk_error, storage_error

__all__ = [
    "DB_NAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "CaseRow",
    "Database",
    "DatasetRow",
    "JobRow",
    "ModelRow",
    "new_id",
    "now_iso",
]

DB_NAME = "acecal.db"


def now_iso() -> str:
    """The current UTC time as stored in the database (ISO 8601, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_id(prefix: str) -> str:
    """A fresh row id, ``<prefix>_<12 hex digits>`` (datasets ``ds``, cases ``c``, jobs ``job``, evaluations ``ev``)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


# --- the schema: a list of migrations, applied in order --------------------------------------------------------------
def _create_tables(c: sqlite3.Connection) -> None:
    """Version 1: datasets, cases, jobs, models."""
    for stmt in (
        """CREATE TABLE IF NOT EXISTS datasets (
            id       TEXT PRIMARY KEY,
            name     TEXT NOT NULL,
            model    TEXT,                 -- model whose labels every case must use (optional)
            created  TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS cases (
            id          TEXT PRIMARY KEY,
            dataset_id  TEXT NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
            name        TEXT NOT NULL,     -- the user's name for the case (display only)
            image       TEXT NOT NULL,     -- path relative to the data directory (server-chosen file name)
            label       TEXT NOT NULL,
            info        TEXT NOT NULL,     -- JSON: size, spacing, label_values, bytes
            created     TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS cases_by_dataset ON cases(dataset_id)",
        """CREATE TABLE IF NOT EXISTS jobs (
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
            error             TEXT,
            pid               INTEGER,
            attempts          INTEGER NOT NULL DEFAULT 0,
            cancel_requested  INTEGER NOT NULL DEFAULT 0,
            created           TEXT NOT NULL,
            started           TEXT,
            finished          TEXT,
            rev               INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status)",
        """CREATE TABLE IF NOT EXISTS models (
            id          TEXT PRIMARY KEY,
            path        TEXT NOT NULL,
            job_id      TEXT,
            parent      TEXT,
            dataset_id  TEXT,
            created     TEXT NOT NULL)""",
    ):
        c.execute(stmt)


def _add_job_result_columns(c: sqlite3.Connection) -> None:
    """Version 2: ``jobs.final_metrics`` (JSON: validation metrics of the published weights) and ``jobs.pid_started``
    (the job process's start time: a reused pid is not the job's). Version-1 databases of later servers already have
    them."""
    have = {r["name"] for r in c.execute("PRAGMA table_info(jobs)").fetchall()}
    for col, decl in (("final_metrics", "TEXT"), ("pid_started", "REAL")):
        if col not in have:
            c.execute(f"ALTER TABLE jobs ADD COLUMN {col} {decl}")


#: every schema change, oldest first; ``PRAGMA user_version`` counts those applied. Append, never edit.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_tables, _add_job_result_columns)
SCHEMA_VERSION = len(MIGRATIONS)


# --- typed rows ------------------------------------------------------------------------------------------------------
@dataclass
class DatasetRow:
    id: str
    name: str
    model: Optional[str]
    created: str
    num_cases: Optional[int] = None  # filled in by Database.list_datasets

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["num_cases"] is None:
            del out["num_cases"]
        return out


@dataclass
class CaseRow:
    id: str
    dataset_id: str
    name: str
    image: str  # relative to the data directory
    label: str
    info: dict[str, Any]  # size, spacing, label_values, bytes
    created: str


@dataclass
class JobRow:
    id: str
    status: str
    request: dict[str, Any]
    config: dict[str, Any]
    epochs: int
    created: str
    kind: str = "finetune"
    base_model: Optional[str] = None
    dataset_id: Optional[str] = None
    model_id: Optional[str] = None
    published: bool = False
    epoch: int = 0
    step: Optional[int] = None
    steps: Optional[int] = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    pid: Optional[int] = None
    pid_started: Optional[float] = None
    attempts: int = 0
    cancel_requested: bool = False
    started: Optional[str] = None
    finished: Optional[str] = None
    rev: int = 0


@dataclass
class ModelRow:
    id: str
    path: str  # relative to the data directory
    job_id: Optional[str]
    parent: Optional[str]
    dataset_id: Optional[str]
    created: str


_JOB_JSON = ("request", "config", "metrics", "final_metrics")
_JOB_BOOL = ("published", "cancel_requested")
_JOB_COLUMNS = frozenset(f.name for f in dataclasses.fields(JobRow))


def _dict_row(cur: sqlite3.Cursor, row: tuple) -> dict:
    return {d[0]: v for d, v in zip(cur.description, row, strict=True)}


def _job(row: dict) -> JobRow:
    for k in _JOB_JSON:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    for k in _JOB_BOOL:
        row[k] = bool(row.get(k))
    row["metrics"] = row.get("metrics") or []
    return JobRow(**{k: v for k, v in row.items() if k in _JOB_COLUMNS})


def _case(row: dict) -> CaseRow:
    info = row.get("info")
    row["info"] = json.loads(info) if isinstance(info, str) else info or {}
    return CaseRow(**row)


def _marks(n: int) -> str:
    return ", ".join("?" * n)


class Database:
    """The state database. Thread-safe: one connection, one lock; every write is one transaction."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self._lock = threading.RLock()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise storage_error(e, f"the state database {self.path}") from None
        self._conn.row_factory = _dict_row
        c = self._conn
        c.execute("PRAGMA busy_timeout=30000")
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode and list(mode.values())[0].lower() != "wal":  # pragma: no cover - e.g. a network file system
            c.execute("PRAGMA journal_mode=DELETE")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @property
    def version(self) -> int:
        """How many of :data:`MIGRATIONS` this database has had."""
        with self._lock:
            return int(list(self._conn.execute("PRAGMA user_version").fetchone().values())[0])

    def _migrate(self) -> None:
        with self._lock:
            version = self.version
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"the state database {self.path} was written by a newer ACECal server (schema "
                    f"{version}, this server knows {SCHEMA_VERSION}); upgrade acecal"
                )
            if version == SCHEMA_VERSION:
                return
            # one transaction: a crash half-way leaves the old version, and the migrations run again
            with self.tx() as c:
                for migration in MIGRATIONS[version:]:
                    migration(c)
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
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

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Optional[dict]:
        rows = self._query(sql, args)
        return rows[0] if rows else None

    # --- datasets and cases --------------------------------------------------------------------------------------
    def add_dataset(self, ds_id: str, name: str, model: Optional[str]) -> DatasetRow:
        row = DatasetRow(ds_id, name, model, now_iso())
        with self.tx() as c:
            c.execute(
                "INSERT INTO datasets (id, name, model, created) VALUES (?, ?, ?, ?)",
                (row.id, row.name, row.model, row.created),
            )
        return row

    def get_dataset(self, ds_id: str) -> Optional[DatasetRow]:
        r = self._one("SELECT * FROM datasets WHERE id = ?", (ds_id,))
        return DatasetRow(**r) if r else None

    def list_datasets(self) -> list[DatasetRow]:
        return [
            DatasetRow(**r)
            for r in self._query(
                "SELECT d.*, (SELECT COUNT(*) FROM cases c WHERE c.dataset_id = d.id) AS num_cases "
                "FROM datasets d ORDER BY d.rowid"
            )
        ]

    def delete_dataset(self, ds_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM cases WHERE dataset_id = ?", (ds_id,))
            c.execute("DELETE FROM datasets WHERE id = ?", (ds_id,))

    def add_case(self, case: CaseRow) -> CaseRow:
        """Insert ``case``; ``sqlite3.IntegrityError`` when its dataset no longer exists."""
        with self.tx() as c:
            c.execute(
                "INSERT INTO cases (id, dataset_id, name, image, label, info, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (case.id, case.dataset_id, case.name, case.image, case.label, dumps_finite(case.info), case.created),
            )
        return case

    def list_cases(self, ds_id: str) -> list[CaseRow]:
        return [_case(r) for r in self._query("SELECT * FROM cases WHERE dataset_id = ? ORDER BY rowid", (ds_id,))]

    def get_case(self, ds_id: str, case_id: str) -> Optional[CaseRow]:
        r = self._one("SELECT * FROM cases WHERE dataset_id = ? AND id = ?", (ds_id, case_id))
        return _case(r) if r else None

    def delete_case(self, ds_id: str, case_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM cases WHERE dataset_id = ? AND id = ?", (ds_id, case_id))

    def all_case_files(self) -> set[str]:
        """Every image and label path (relative to the data directory) a case row refers to."""
        out: set[str] = set()
        for r in self._query("SELECT image, label FROM cases"):
            out.update((r["image"], r["label"]))
        return out

    # --- jobs ----------------------------------------------------------------------------------------------------
    def add_job(self, job: JobRow) -> JobRow:
        row = dataclasses.asdict(job)
        del row["rev"]
        for k in _JOB_JSON:
            row[k] = dumps_finite(row[k])
        for k in _JOB_BOOL:
            row[k] = int(row[k])
        with self.tx() as c:
            c.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})", row)
        added = self.get_job(job.id)
        assert added is not None  # inserted just now; jobs are never deleted
        return added

    def get_job(self, job_id: str) -> Optional[JobRow]:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else _job(row)

    def list_jobs(self, status: Optional[str] = None, limit: int = 1000) -> list[JobRow]:
        """Newest first."""
        if status:
            rows = self._query("SELECT * FROM jobs WHERE status = ? ORDER BY rowid DESC LIMIT ?", (status, limit))
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY rowid DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def jobs_with_status(self, *statuses: str) -> list[JobRow]:
        """Oldest first."""
        return [
            _job(r)
            for r in self._query(
                f"SELECT * FROM jobs WHERE status IN ({_marks(len(statuses))}) ORDER BY rowid", statuses
            )
        ]

    def count_jobs(self, *statuses: str) -> int:
        r = self._one(f"SELECT COUNT(*) AS n FROM jobs WHERE status IN ({_marks(len(statuses))})", statuses)
        return int(r["n"]) if r else 0

    def queued_job_ids(self) -> list[str]:
        """Ids of the queued jobs in the order they run."""
        return [r["id"] for r in self._query("SELECT id FROM jobs WHERE status = ? ORDER BY rowid", (JOB_QUEUED,))]

    def update_job(self, job_id: str, *, only_if_status: Optional[Sequence[str]] = None, **fields: Any) -> bool:
        """Set ``fields`` (JSON fields serialised) and bump ``rev``; with ``only_if_status`` only from those states.
        Returns whether a row changed."""
        if not fields:
            return False
        unknown = set(fields) - _JOB_COLUMNS - {"rev"}
        if unknown:
            raise ValueError(f"not job columns: {', '.join(sorted(unknown))}")
        vals = {k: (dumps_finite(v) if k in _JOB_JSON else int(v) if k in _JOB_BOOL else v) for k, v in fields.items()}
        sql = "UPDATE jobs SET " + ", ".join(f"{k} = :{k}" for k in vals) + ", rev = rev + 1 WHERE id = :_id"
        args = {**vals, "_id": job_id}
        if only_if_status:
            sql += " AND status IN (" + ", ".join(f":_s{i}" for i in range(len(only_if_status))) + ")"
            args.update({f"_s{i}": s for i, s in enumerate(only_if_status)})
        with self.tx() as c:
            return c.execute(sql, args).rowcount > 0

    def active_jobs_using(self, ds_id: str) -> list[JobRow]:
        return [
            _job(r)
            for r in self._query(
                f"SELECT * FROM jobs WHERE dataset_id = ? AND status IN ({_marks(len(ACTIVE_JOB_STATUSES))}) "
                "ORDER BY rowid",
                (ds_id, *ACTIVE_JOB_STATUSES),
            )
        ]

    def model_id_reserved(self, model_id: str) -> bool:
        """Whether a queued or running job will publish a model with this id."""
        return (
            self._one(
                f"SELECT 1 AS x FROM jobs WHERE model_id = ? AND status IN ({_marks(len(ACTIVE_JOB_STATUSES))})",
                (model_id, *ACTIVE_JOB_STATUSES),
            )
            is not None
        )

    # --- models (index of published fine-tuned bundles) ----------------------------------------------------------
    def add_model(
        self, model_id: str, path: str, *, job_id: Optional[str], parent: Optional[str], dataset_id: Optional[str]
    ) -> ModelRow:
        row = ModelRow(model_id, path, job_id, parent, dataset_id, now_iso())
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO models (id, path, job_id, parent, dataset_id, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                dataclasses.astuple(row),
            )
        return row

    def get_model(self, model_id: str) -> Optional[ModelRow]:
        r = self._one("SELECT * FROM models WHERE id = ?", (model_id,))
        return ModelRow(**r) if r else None
