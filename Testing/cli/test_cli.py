"""``acecal serve`` as a real subprocess, ``acecal models`` and ``acecal infer`` through it and in-process."""

import json

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from live_server import start_cli_server, stop_process
from oblique import oblique_case
from synthetic import dice, make_case, write_case
from typer.testing import CliRunner

from acecal.cli.main import _register, app
from acecal.data.io import grid_of, write_volume
from acecal.protocol import VOLUMES

KEY = "cli-test-key"
VOLS = VOLUMES


@pytest.fixture(scope="module")
def cli():
    _register()
    return CliRunner()


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    data = tmp_path_factory.mktemp("cli-data")
    proc, url = start_cli_server(
        ["--models", str(tiny_bundle.parent), "--data-dir", str(data)], env={"ACECAL_API_KEY": KEY}
    )
    yield url
    stop_process(proc)


def test_serve_starts_with_no_models(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    proc, url = start_cli_server(
        [
            "--models",
            str(empty),
            "--models",
            str(tmp_path / "missing"),
            "--data-dir",
            str(tmp_path / "data"),
            "--default-model",
            "my-default",
        ]
    )
    try:
        health = requests.get(url + "/health", timeout=5).json()
        assert health["status"] == "ok"
        assert health["default_model"] is None and health["default_model_configured"] == "my-default"
        assert requests.get(url + "/models", timeout=5).json() == {"models": [], "problems": []}
    finally:
        out = stop_process(proc)
    assert "no model bundles found" in out
    assert "default model 'my-default' is not served and there is no other model" in out


def test_serve_takes_the_key_from_the_environment(served):
    assert requests.get(served + "/models", timeout=5).status_code == 401
    r = requests.get(served + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert [m["id"] for m in r.json()["models"]] == ["tiny-sphere"]


def test_models_command(cli, served, monkeypatch):
    monkeypatch.delenv("ACECAL_API_KEY", raising=False)
    r = cli.invoke(app, ["models", "--server", served, "--api-key", KEY, "--json"])
    assert r.exit_code == 0, r.output
    assert [m["id"] for m in json.loads(r.stdout)["models"]] == ["tiny-sphere"]
    r = cli.invoke(app, ["models", "--server", served])
    assert r.exit_code == 1 and "API key" in r.output
    r = cli.invoke(app, ["models", "--server", served], env={"ACECAL_API_KEY": KEY})
    assert r.exit_code == 0 and "tiny-sphere" in r.stdout
    r = cli.invoke(app, ["models", "--server", served, "--api-key", "wrong"])
    assert r.exit_code == 1 and "refused" in r.output


def _images(tmp_path):
    a = make_case((24, 24, 24), seed=41)
    write_case(a, tmp_path / "in" / "first.nii.gz")
    image, label, grid, _ = oblique_case(seed=42)
    write_volume(image, grid, tmp_path / "in" / "second.nrrd")
    return [tmp_path / "in" / "first.nii.gz", tmp_path / "in" / "second.nrrd"], [a.label, label]


def test_infer_through_the_server_and_in_process_give_the_same_outputs(cli, served, tiny_bundle, tmp_path, monkeypatch):
    images, truths = _images(tmp_path)
    monkeypatch.setenv("ACECAL_API_KEY", KEY)
    remote = cli.invoke(
        app,
        [
            "infer",
            "--server",
            served,
            "--model",
            "tiny-sphere",
            *map(str, images),
            "--out",
            str(tmp_path / "remote"),
            "--threshold",
            "0.9",
        ],
    )
    assert remote.exit_code == 0, remote.output
    local = cli.invoke(
        app,
        [
            "infer",
            "--model",
            str(tiny_bundle),
            *map(str, images),
            "--out",
            str(tmp_path / "local"),
            "--threshold",
            "0.9",
            "--device",
            "cpu",
        ],
    )
    assert local.exit_code == 0, local.output
    for img, truth, name in zip(images, truths, ("first", "second"), strict=True):
        src = sitk.ReadImage(str(img))
        for mode in ("remote", "local"):
            d = tmp_path / mode / name
            assert sorted(p.name for p in d.iterdir()) == sorted([f"{v}.nrrd" for v in VOLS] + ["summary.json"])
            for v in VOLS:
                assert grid_of(sitk.ReadImage(str(d / f"{v}.nrrd"))).same_as(grid_of(src), atol=1e-6), (mode, v)
            assert dice(sitk.GetArrayFromImage(sitk.ReadImage(str(d / "labels.nrrd"))), truth) > 0.85
        r_sum = json.loads((tmp_path / "remote" / name / "summary.json").read_text())
        l_sum = json.loads((tmp_path / "local" / name / "summary.json").read_text())
        assert r_sum["files"] == l_sum["files"] == {v: f"{v}.nrrd" for v in VOLS}
        assert r_sum["params"] == l_sum["params"] and r_sum["params"]["uncertainty_threshold"] == 0.9
        assert r_sum["grid"] == l_sum["grid"] and r_sum["labels"] == l_sum["labels"]
        assert r_sum["summary"]["classes"] == l_sum["summary"]["classes"]
        assert [r["voxels"] for r in r_sum["regions"]] == [r["voxels"] for r in l_sum["regions"]]
        for v in VOLS:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "remote" / name / f"{v}.nrrd")))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local" / name / f"{v}.nrrd")))
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_infer_through_the_server_without_a_model_uses_the_servers_default(cli, served, tmp_path):
    good = make_case((16, 16, 16), seed=5)
    write_case(good, tmp_path / "good.nrrd")
    r = cli.invoke(app, ["infer", "-s", served, "--api-key", KEY, str(tmp_path / "good.nrrd"), "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    # the served tiny model stands in for the configured default (hippocampus-ace is not served here)
    assert "model: tiny-sphere (the server's default)" in r.output
    assert json.loads((tmp_path / "good" / "summary.json").read_text())["model_id"] == "tiny-sphere"
    r = cli.invoke(app, ["models", "--server", served, "--api-key", KEY])
    assert r.exit_code == 0 and "tiny-sphere *" in r.stdout and "default model" in r.stdout
    for flag in ("--no-calibrator", "--no-temperature"):  # the switch, and its older name
        out = tmp_path / flag.strip("-")
        r = cli.invoke(
            app, ["infer", "-s", served, "--api-key", KEY, flag, str(tmp_path / "good.nrrd"), "-o", str(out)]
        )
        assert r.exit_code == 0, r.output
        assert json.loads((out / "good" / "summary.json").read_text())["params"]["use_calibrator"] is False
    r = cli.invoke(app, ["infer", str(tmp_path / "good.nrrd"), "-o", str(tmp_path / "local")])
    assert r.exit_code == 2 and "--model is needed without --server" in r.output


def test_infer_reports_bad_images_and_carries_on(cli, served, tmp_path):
    good = make_case((16, 16, 16), seed=3)
    write_case(good, tmp_path / "good.nrrd")
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really")
    r = cli.invoke(
        app,
        [
            "infer",
            "-s",
            served,
            "--api-key",
            KEY,
            "-m",
            "tiny-sphere",
            str(tmp_path / "bad.nii.gz"),
            str(tmp_path / "good.nrrd"),
            "-o",
            str(tmp_path / "out"),
            "-q",
        ],
    )
    assert r.exit_code == 1
    assert "bad.nii.gz" in r.output and "1 of 2 image(s) failed" in r.output
    assert (tmp_path / "out" / "good" / "summary.json").is_file()
    assert not (tmp_path / "out" / "bad" / "summary.json").exists()
    r = cli.invoke(
        app, ["infer", "-s", served, "-m", "tiny-sphere", str(tmp_path / "nope.nrrd"), "-o", str(tmp_path / "out")]
    )
    assert r.exit_code == 2 and "no such file" in r.output


def test_infer_in_process_with_an_unknown_model_says_so(cli, tmp_path):
    good = make_case((12, 12, 12), seed=3)
    write_case(good, tmp_path / "good.nrrd")
    r = cli.invoke(
        app,
        [
            "infer",
            "-m",
            "no-such-model",
            "--models",
            str(tmp_path),
            str(tmp_path / "good.nrrd"),
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 1 and "unknown model 'no-such-model'" in r.output
