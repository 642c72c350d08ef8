"""The extension's own copy of the light client (``ACECalibrationLib.client``): generated, identical, and working on the
Python versions 3D Slicer ships (3.9 in 5.8, 3.12 in 5.10-5.12) with only numpy and requests, against a live server.

The 3.9 and 3.12 interpreters are the virtual environments ``make light-venvs`` (part of ``make test``) builds with
the numpy, requests and urllib3 versions of Slicer 5.8.1 and 5.12.3; ``ACECAL_TEST_PY39`` / ``ACECAL_TEST_PY312``
point elsewhere. Each runs in isolated mode (``-I``: no site-packages of this project, no ``PYTHONPATH``) with only
``ACECalibration/`` on its path, as inside Slicer.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "ACECalibration"
GENERATOR = MODULE_DIR / "CMake" / "generate_light_client.py"
COPY = MODULE_DIR / "ACECalibrationLib" / "client"


def _generator():
    spec = importlib.util.spec_from_file_location("generate_light_client", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_copy_is_what_the_generator_makes():
    gen = _generator()
    files = gen.generate(ROOT / "server" / "acecal")
    problems = gen.differences(files, COPY)
    assert not problems, (
        f"ACECalibrationLib/client differs from server/acecal ({problems}); run "
        "python ACECalibration/CMake/generate_light_client.py"
    )
    assert set(files) == {f"{target}.py" for _, target in gen.SOURCES}
    # the CLI's --check agrees (CMake and developers use the script itself)
    r = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_copy_imports_only_the_standard_library_numpy_and_requests():
    allowed = set(sys.stdlib_module_names) | {"numpy", "requests"}
    for path in sorted(COPY.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            outside = [n for n in names if n.split(".")[0] not in allowed]
            assert not outside, f"{path.name} imports {outside}"


def test_the_generator_refuses_what_it_cannot_copy(tmp_path):
    gen = _generator()
    src = tmp_path / "acecal"
    (src / "client").mkdir(parents=True)
    for rel, _ in gen.SOURCES:
        (src / rel).write_text('"""doc: from acecal.bundles import x stays in a docstring"""\nX = 1\n')
    assert gen.generate(src)["__init__.py"].count("from acecal.bundles import x") == 1  # docstrings untouched
    (src / "nrrd.py").write_text("def f():\n    from acecal.bundles import load\n")
    with pytest.raises(gen.GenerationError, match="acecal.bundles, which is not part of the light client"):
        gen.generate(src)
    (src / "nrrd.py").write_text("import acecal.errors\n")
    with pytest.raises(gen.GenerationError, match="cannot be made relative"):
        gen.generate(src)
    (src / "nrrd.py").unlink()
    with pytest.raises(gen.GenerationError, match="missing source"):
        gen.generate(src)
    # writing replaces stale files and removes ones no longer generated
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.py").write_text("x = 1\n")
    (src / "nrrd.py").write_text("from acecal.geometry import Grid\n")
    gen.write(gen.generate(src), out)
    assert sorted(p.name for p in out.glob("*.py")) == sorted(f"{t}.py" for _, t in gen.SOURCES)
    assert (out / "nrrd.py").read_text().endswith("from .geometry import Grid\n")


# ------------------------------------------------------------------------------------- under Slicer's Pythons
INTERPRETERS = {
    "3.9": ("ACECAL_TEST_PY39", ROOT / ".venv" / "light-py3.9" / "bin" / "python"),
    "3.12": ("ACECAL_TEST_PY312", ROOT / ".venv" / "light-py3.12" / "bin" / "python"),
}

SCRIPT = textwrap.dedent("""
    import json, socket, sys, threading, time
    sys.path.insert(0, sys.argv[1])                    # ACECalibration/: nothing else of this project
    sys.modules["acecal"] = None                       # the server package is not there (and must not be needed)
    import numpy as np
    import requests
    from ACECalibrationLib.client import ACEClient, Grid, UnauthorizedError, ServerUnreachableError
    from ACECalibrationLib.transport import AbortableSession

    url, key, model, sample, reference = sys.argv[2:7]
    out = {"python": sys.version.split()[0], "numpy": np.__version__, "requests": requests.__version__}
    c = ACEClient(url, api_key=key, timeout=(5, 120), retries=0)
    out["health"] = c.health()["status"]
    out["models"] = [m.id for m in c.models()]
    try:
        ACEClient(url, api_key="wrong", retries=0).models()
    except UnauthorizedError:
        out["wrong_key"] = "refused"

    # a real volume: a bright sphere on an oblique, anisotropic grid (what the tiny model learned)
    direction = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    grid = Grid((26, 20, 24), (0.9, 1.3, 1.1), (-120.5, 37.25, 410.0), tuple(direction.ravel()))
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape_zyx], indexing="ij")
    lps = grid.index_to_lps(np.stack([i, j, k], axis=-1))
    centre = grid.index_to_lps((np.asarray(grid.size, float) - 1) / 2)
    truth = (np.linalg.norm(lps - centre, axis=-1) <= 5.5).astype(np.uint8)
    image = ((truth + np.random.default_rng(3).normal(0, 0.15, truth.shape)) * 10).astype(np.float32)
    res = c.infer((image, grid), model, params={"uncertainty_threshold": 0.999})
    seg = res.label_map > 0
    out["dice"] = float(2 * (seg & (truth > 0)).sum() / (seg.sum() + truth.sum()))
    out["same_grid"] = bool(res.grid.same_as(grid)) and res.confidence.shape == grid.shape_zyx
    out["confidence_range"] = [float(res.confidence.min()), float(res.confidence.max())]
    out["region_keys"] = sorted(res.regions[0].raw) if res.regions else []

    # a real scan: the sample hippocampus MRI, uploaded as the file it is, segmented by a shipped model; Dice per
    # structure against its reference segmentation (a Slicer .seg.nrrd, read by the copy's own NRRD codec)
    from ACECalibrationLib.client.nrrd import read_nrrd
    real = c.infer(sample, "hippocampus-softace")
    ref = read_nrrd(reference)
    out["real_same_grid"] = bool(real.grid.same_as(ref.grid)) and real.label_map.shape == ref.array.shape
    out["real_dice"] = [float(2 * ((real.label_map == v) & (ref.array == v)).sum()
                              / ((real.label_map == v).sum() + (ref.array == v).sum())) for v in (1, 2)]

    # upload a case and run a (one-epoch) fine-tuning job on it
    ds = c.create_dataset("py" + out["python"], model=model)["id"]
    for n in range(2):
        c.add_case(ds, (image, grid), (truth, grid), name=f"case {n + 1}")
    out["cases"] = c.dataset(ds)["num_cases"]
    job = c.finetune(model, ds, loss="hardl1ace_dice_ce", epochs=1, val_fraction=0.5)
    out["job"] = c.wait_job(job["job_id"], timeout=240, poll_s=1.0)["status"]

    # Cancel's transport: a request waiting on a hung server is broken at once
    hung = socket.socket(); hung.bind(("127.0.0.1", 0)); hung.listen(1)
    session = AbortableSession()
    hc = ACEClient("http://127.0.0.1:%d" % hung.getsockname()[1], timeout=(2, 60), retries=0, session=session)
    errors = []
    def wait_on_hung():
        try:
            hc.health()
        except ServerUnreachableError as e:
            errors.append(type(e).__name__)
    t0 = time.monotonic(); worker = threading.Thread(target=wait_on_hung); worker.start()
    time.sleep(0.3); session.abort(); worker.join(10)
    out["abort_s"] = round(time.monotonic() - t0, 2)
    out["abort_error"] = errors
    out["acecal_loaded"] = [m for m in sys.modules if m == "acecal" or m.startswith("acecal.")
                            if sys.modules[m] is not None]
    print(json.dumps(out))
""")


def _interpreter(version: str) -> Path:
    env, default = INTERPRETERS[version]
    path = Path(os.environ.get(env) or default)
    if not path.is_file():
        pytest.skip(
            f"no Python {version} environment at {path} (make light-venvs builds it from pyenv's "
            f"{version}; or set {env})"
        )
    return path


@pytest.mark.parametrize("version", list(INTERPRETERS))
def test_light_client_on_slicers_python_against_a_live_server(version, server, server_key):
    python = _interpreter(version)
    sample = MODULE_DIR / "Resources" / "SampleData"
    r = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            SCRIPT,
            str(MODULE_DIR),
            server.url,
            server_key,
            "tiny-sphere",
            str(sample / "ACECalHippocampus.nii.gz"),
            str(sample / "ACECalHippocampusReference.seg.nrrd"),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=str(Path(python).parent),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["python"].startswith(version + "."), out
    assert out["health"] == "ok" and "tiny-sphere" in out["models"] and out["wrong_key"] == "refused"
    assert out["dice"] > 0.8 and out["same_grid"], out
    assert out["real_same_grid"] and min(out["real_dice"]) > 0.75, out  # anterior, posterior hippocampus
    assert 0.0 <= out["confidence_range"][0] <= out["confidence_range"][1] <= 1.0
    assert {"voxels", "volume_ml", "mean_confidence", "centroid_ras", "class", "class_name"} <= set(out["region_keys"])
    assert out["cases"] == 2 and out["job"] == "succeeded", out
    assert out["abort_error"] == ["ServerUnreachableError"] and out["abort_s"] < 3.0, out
    assert out["acecal_loaded"] == []
