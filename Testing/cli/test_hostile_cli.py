"""The CLI's readers on hostile files: ``acecal infer`` (in-process and through a server) and ``acecal evaluate`` never
follow a header to another file, never block on a FIFO, and apply the voxel budget (ACECAL_MAX_VOXELS)."""

from __future__ import annotations

import os
import threading

import pytest
from hostile import fifo, mha_pointer, nifti_gz_bomb, nrrd_pointer, secret_file
from synthetic import make_dataset
from typer.testing import CliRunner

from acecal.cli.main import _register, app


@pytest.fixture(scope="module")
def cli():
    _register()
    return CliRunner()


def _invoke(cli, args, env=None, timeout: float = 60.0):
    """Run the CLI in a thread: a reader blocking on a FIFO fails the test instead of hanging it."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", cli.invoke(app, args, env=env)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"acecal {' '.join(args[:2])} blocked"
    return out["r"]


def test_infer_in_process_refuses_pointers(cli, tiny_bundle, tmp_path):
    secret, token = secret_file(tmp_path)
    (tmp_path / "in").mkdir()
    files = {
        "abs.mha": mha_pointer(str(secret)),
        "rel.nrrd": nrrd_pointer(os.path.relpath(secret, tmp_path / "in")),
        "zero.nrrd": nrrd_pointer("/dev/zero", sizes=(1024, 1024, 1024)),
    }
    for name, blob in files.items():
        (tmp_path / "in" / name).write_bytes(blob)
    r = _invoke(
        cli,
        [
            "infer",
            "-m",
            str(tiny_bundle),
            *[str(tmp_path / "in" / n) for n in files],
            "-o",
            str(tmp_path / "out"),
            "-q",
        ],
    )
    assert r.exit_code == 1, r.output
    assert r.output.count("does not hold its voxel data") == 3, r.output
    assert token.decode() not in r.output and "3 of 3 image(s) failed" in r.output


@pytest.mark.parametrize("remote", [False, True])
def test_infer_refuses_a_fifo_without_opening_it(cli, tiny_bundle, tmp_path, remote):
    pipe = fifo(tmp_path, "scan.nrrd")
    where = ["-s", "http://127.0.0.1:9"] if remote else []  # nothing listens there: the file is refused first
    r = _invoke(
        cli,
        [
            "infer",
            *where,
            "-m",
            str(tiny_bundle) if not remote else "tiny-sphere",
            str(pipe),
            "-o",
            str(tmp_path / "out"),
            "-q",
        ],
        timeout=20,
    )
    assert r.exit_code == 2 and "not regular file" in r.output, r.output


def test_infer_applies_the_voxel_budget_from_the_environment(cli, tiny_bundle, tmp_path):
    (tmp_path / "big.nii.gz").write_bytes(nifti_gz_bomb((256, 256, 256), 0))  # 64 MB announced in 1 KB
    r = _invoke(
        cli,
        ["infer", "-m", str(tiny_bundle), str(tmp_path / "big.nii.gz"), "-o", str(tmp_path / "o"), "-q"],
        env={"ACECAL_MAX_VOXELS": "1000000"},
    )
    assert r.exit_code == 1 and "16,777,216 voxel values" in r.output and "ACECAL_MAX_VOXELS" in r.output, r.output


def test_evaluate_refuses_a_label_pointing_elsewhere(cli, tiny_bundle, tmp_path):
    data = make_dataset(tmp_path / "data", 2, layout="folders", seed=3, shape_zyx=(16, 16, 16))
    secret, token = secret_file(tmp_path)
    victim = sorted((data / "labels").iterdir())[0]
    victim.unlink()
    (data / "labels" / (victim.name.split(".")[0] + ".mha")).write_bytes(
        mha_pointer(os.path.relpath(secret, data / "labels"), element_type="MET_UCHAR")
    )
    r = _invoke(
        cli,
        [
            "evaluate",
            "-m",
            str(tiny_bundle),
            "--images",
            str(data / "images"),
            "--labels",
            str(data / "labels"),
            "--out",
            str(tmp_path / "report"),
            "-q",
            "--no-plots",
        ],
    )
    assert r.exit_code == 2 and "does not hold its voxel data" in r.output, r.output
    assert token.decode() not in r.output and "label values" not in r.output
