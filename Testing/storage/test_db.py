"""acecal.storage.db: migrations in order, typed rows, refusals (a newer schema, unknown columns, a full disk)."""

import sqlite3

import pytest

from acecal.errors import StorageError
from acecal.protocol import JOB_CANCELLED, JOB_QUEUED, JOB_RUNNING
from acecal.storage.db import DB_NAME, MIGRATIONS, SCHEMA_VERSION, CaseRow, Database, JobRow, new_id, now_iso

# the jobs table of the first version-1 databases, before final_metrics and pid_started existed
_OLD_V1 = """
CREATE TABLE datasets (id TEXT PRIMARY KEY, name TEXT NOT NULL, model TEXT, created TEXT NOT NULL);
CREATE TABLE cases (id TEXT PRIMARY KEY, dataset_id TEXT NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    name TEXT NOT NULL, image TEXT NOT NULL, label TEXT NOT NULL, info TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL DEFAULT 'finetune', status TEXT NOT NULL,
    request TEXT NOT NULL, config TEXT NOT NULL, base_model TEXT, dataset_id TEXT, model_id TEXT,
    published INTEGER NOT NULL DEFAULT 0, epochs INTEGER NOT NULL, epoch INTEGER NOT NULL DEFAULT 0, step INTEGER,
    steps INTEGER, metrics TEXT NOT NULL DEFAULT '[]', error TEXT, pid INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL, started TEXT, finished TEXT,
    rev INTEGER NOT NULL DEFAULT 0);
CREATE TABLE models (id TEXT PRIMARY KEY, path TEXT NOT NULL, job_id TEXT, parent TEXT, dataset_id TEXT,
    created TEXT NOT NULL);
INSERT INTO datasets VALUES ('ds_old', 'old data', NULL, '2024-01-01T00:00:00+00:00');
INSERT INTO jobs (id, status, request, config, epochs, created, metrics)
    VALUES ('job_old', 'succeeded', '{"loss": "hardl1ace_dice_ce"}', '{}', 3, '2024-01-01T00:00:00+00:00',
            '[{"epoch": 1, "dice": 0.5}]');
PRAGMA user_version=1;
"""


def _job(**kw) -> JobRow:
    return JobRow(
        **{
            "id": new_id("job"),
            "status": JOB_QUEUED,
            "request": {"loss": "x"},
            "config": {"epochs": 2},
            "epochs": 2,
            "created": now_iso(),
            **kw,
        }
    )


def test_a_new_database_has_every_migration(tmp_path):
    db = Database(tmp_path)
    assert db.version == SCHEMA_VERSION == len(MIGRATIONS) == 2
    db.close()
    again = Database(tmp_path)  # reopening applies nothing twice
    assert again.version == SCHEMA_VERSION
    again.close()


def test_an_old_version_1_database_is_brought_up_to_date_and_keeps_its_rows(tmp_path):
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.executescript(_OLD_V1)
    conn.close()
    db = Database(tmp_path)
    assert db.version == SCHEMA_VERSION
    job = db.get_job("job_old")
    assert job.request == {"loss": "hardl1ace_dice_ce"} and job.metrics == [{"epoch": 1, "dice": 0.5}]
    assert job.final_metrics is None and job.pid_started is None  # the added columns exist, empty
    assert db.update_job("job_old", final_metrics={"dice": 0.9}, pid_started=12.5)
    job = db.get_job("job_old")
    assert job.final_metrics == {"dice": 0.9} and job.pid_started == 12.5 and job.rev == 1
    assert [d.id for d in db.list_datasets()] == ["ds_old"]
    db.close()


def test_a_database_of_a_newer_server_is_refused(tmp_path):
    Database(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError, match="written by a newer ACECal server"):
        Database(tmp_path)


def test_rows_are_typed_and_round_trip(tmp_path):
    db = Database(tmp_path)
    ds = db.add_dataset("ds_a", "spheres", "tiny-sphere")
    assert db.get_dataset("ds_a") == ds and ds.to_json() == {
        "id": "ds_a",
        "name": "spheres",
        "model": "tiny-sphere",
        "created": ds.created,
    }
    info = {"size": [4, 4, 4], "spacing": [1.0, 1.0, float("nan")]}
    case = db.add_case(
        CaseRow(
            "c_1",
            "ds_a",
            "case 1",
            "datasets/ds_a/images/c_1.nii.gz",
            "datasets/ds_a/labels/c_1.nii.gz",
            info,
            now_iso(),
        )
    )
    stored = db.get_case("ds_a", "c_1")
    assert stored.info == {"size": [4, 4, 4], "spacing": [1.0, 1.0, None]}  # NaN is never stored
    assert stored.image == case.image and db.all_case_files() == {case.image, case.label}
    assert db.list_datasets()[0].num_cases == 1
    with pytest.raises(sqlite3.IntegrityError):  # a case of a dataset that is gone
        db.add_case(CaseRow("c_2", "ds_gone", "x", "a", "b", {}, now_iso()))

    job = db.add_job(_job(dataset_id="ds_a", model_id="m-ft"))
    assert isinstance(job, JobRow) and job.status == JOB_QUEUED and job.cancel_requested is False and job.rev == 0
    assert db.model_id_reserved("m-ft") and [j.id for j in db.active_jobs_using("ds_a")] == [job.id]
    second = db.add_job(_job())
    assert db.queued_job_ids() == [job.id, second.id]
    assert [j.id for j in db.list_jobs()] == [second.id, job.id]  # newest first
    # a state change only from the given states
    assert not db.update_job(job.id, only_if_status=(JOB_RUNNING,), status=JOB_CANCELLED)
    assert db.update_job(
        job.id,
        only_if_status=(JOB_QUEUED,),
        status=JOB_RUNNING,
        cancel_requested=True,
        metrics=[{"epoch": 1, "ace": float("inf")}],
    )
    job = db.get_job(job.id)
    assert job.status == JOB_RUNNING and job.cancel_requested is True and job.metrics == [{"epoch": 1, "ace": None}]
    assert db.count_jobs(JOB_QUEUED) == 1 and db.count_jobs(JOB_QUEUED, JOB_RUNNING) == 2
    with pytest.raises(ValueError, match="not job columns"):
        db.update_job(job.id, **{"status = 'x'; --": 1})

    model = db.add_model("m-ft", "models/m-ft", job_id=job.id, parent="tiny-sphere", dataset_id="ds_a")
    assert db.get_model("m-ft") == model
    db.delete_dataset("ds_a")
    assert db.get_dataset("ds_a") is None and db.list_cases("ds_a") == []
    db.close()


def test_a_full_database_is_a_storage_error_and_changes_nothing(tmp_path):
    db = Database(tmp_path)
    db.add_dataset("ds_a", "a", None)
    # SQLite's own "database or disk is full": no page may be added beyond the ones it has
    pages = db._conn.execute("PRAGMA page_count").fetchone()["page_count"]
    db._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageError, match="cannot write the state database: database or disk is full"):
        db.add_case(CaseRow("c_1", "ds_a", "big", "a", "b", {"pad": "x" * 200_000}, now_iso()))
    assert db.list_cases("ds_a") == [] and [d.id for d in db.list_datasets()] == ["ds_a"]
    db.close()
