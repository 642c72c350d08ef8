"""``acecal finetune --wait`` as a real subprocess against a live server, and ``acecal jobs``, ``acecal cancel``,
``acecal datasets``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from acecal.cli.main import _register, app
from acecal.client import ACEClient


@pytest.fixture(scope="module")
def cli():
    _register()
    return CliRunner()


def test_finetune_wait_uploads_trains_and_prints_the_new_model_id(ft_server, cases_dir):
    cmd = [
        sys.executable,
        "-m",
        "acecal.cli.main",
        "finetune",
        "--server",
        ft_server.url,
        "--base",
        "tiny-sphere",
        "--images",
        str(cases_dir / "images"),
        "--labels",
        str(cases_dir / "labels"),
        "--loss",
        "hardl1ace_dice_ce",
        "--epochs",
        "2",
        "--val-every",
        "1",
        "--name",
        "cli upload",
        "--wait",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("ACECAL_API_KEY", None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    model_id = r.stdout.strip().splitlines()[-1]
    assert r.stdout.strip() == model_id  # stdout holds the id only: MODEL=$(acecal finetune ... --wait)
    assert "4 case(s) uploaded" in r.stderr and "succeeded" in r.stderr
    assert "val dice" in r.stderr  # the validation metrics were shown
    with ACEClient(ft_server.url) as c:
        m = c.model(model_id)
        assert m.raw["parent"] == "tiny-sphere" and m.loss == "hardl1ace_dice_ce"
        assert "cli upload" in [d["name"] for d in c.datasets()]


def test_finetune_refuses_bad_input_before_uploading(cli, ft_server, cases_dir, tmp_path):
    with ACEClient(ft_server.url) as c:
        before = len(c.datasets())
    r = cli.invoke(app, ["finetune", "--server", ft_server.url, "--base", "tiny-sphere", "--epochs", "1"])
    assert r.exit_code == 2 and "--images" in r.output
    r = cli.invoke(
        app,
        [
            "finetune",
            "--server",
            ft_server.url,
            "--base",
            "no-such-model",
            "--images",
            str(cases_dir / "images"),
            "--labels",
            str(cases_dir / "labels"),
        ],
    )
    assert r.exit_code == 1 and "unknown model 'no-such-model'" in r.output
    (tmp_path / "labels").mkdir()
    r = cli.invoke(
        app,
        [
            "finetune",
            "--server",
            ft_server.url,
            "--base",
            "tiny-sphere",
            "--images",
            str(cases_dir / "images"),
            "--labels",
            str(tmp_path / "labels"),
        ],
    )
    assert r.exit_code == 1 and "do not pair up" in r.output and "case_000.nii.gz: no label" in r.output
    with ACEClient(ft_server.url) as c:
        assert len(c.datasets()) == before


def test_jobs_cancel_and_datasets_commands(cli, ft_server, dataset_id):
    url = ft_server.url
    r = cli.invoke(
        app,
        [
            "finetune",
            "--server",
            url,
            "--base",
            "tiny-sphere",
            "--dataset",
            dataset_id,
            "--epochs",
            "1",
            "--no-wait",
            "--model-id",
            "tiny-sphere-cli",
        ],
    )
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip().splitlines()[-1]
    assert job_id.startswith("job_")
    r = cli.invoke(app, ["jobs", job_id, "--follow", "--server", url])
    assert r.exit_code == 0, r.output
    assert "succeeded" in r.output
    r = cli.invoke(app, ["jobs", job_id, "--json", "--server", url])
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded" and job["model_id"] == "tiny-sphere-cli"
    r = cli.invoke(app, ["jobs", "--server", url], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and job_id in r.stdout
    r = cli.invoke(app, ["jobs", "--status", "succeeded", "--json", "--server", url])
    assert job_id in [j["id"] for j in json.loads(r.stdout)["jobs"]]
    # cancelling a finished job changes nothing, and says so
    r = cli.invoke(app, ["cancel", job_id, "--server", url])
    assert r.exit_code == 0 and f"job {job_id}: succeeded" in r.output and "already finished" in r.output
    r = cli.invoke(app, ["cancel", "job_000000000000", "--server", url])
    assert r.exit_code == 1 and "unknown job" in r.output
    # datasets: list, show, delete
    r = cli.invoke(app, ["datasets", "--server", url, "--json"])
    assert dataset_id in [d["id"] for d in json.loads(r.stdout)["datasets"]]
    r = cli.invoke(app, ["datasets", dataset_id, "--server", url], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "case_000" in r.stdout
    with ACEClient(url) as c:
        scratch = c.create_dataset("scratch")["id"]
    r = cli.invoke(app, ["datasets", scratch, "--delete", "--server", url])
    assert r.exit_code == 0 and "deleted" in r.stdout
    r = cli.invoke(app, ["datasets", scratch, "--server", url])
    assert r.exit_code == 1 and "unknown dataset" in r.output
