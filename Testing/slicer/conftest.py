"""Tests of the Slicer module's Lib on real MRML (slicer-core), without the Slicer application.

Puts ``ACECalibration/`` on ``sys.path`` so ``import ACECalibrationLib`` works as inside Slicer, and skips the whole
directory where slicer-core is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "ACECalibration"
for _p in (
    MODULE_DIR,
    ROOT / "Testing",
    ROOT / "Testing" / "slicer",
):  # ACECalibrationLib; oblique.py, live_server.py, ...; slicer_api.py
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

pytest.importorskip(
    "slicer_core", reason="slicer-core (pip install slicer-core==5.13.31053.0) is needed for the Slicer tests"
)


@pytest.fixture
def scene():
    """A fresh MRML scene with the segmentations logic registered."""
    from ACECalibrationLib.nodes import new_scene

    s = new_scene()
    yield s
    s.Clear(1)


#: API key of the live test server (so every call the Lib makes is authenticated)
SERVER_KEY = "slicer-test-key"


@pytest.fixture(scope="session")
def server_key() -> str:
    return SERVER_KEY


@pytest.fixture(scope="session")
def server(tiny_bundle, tmp_path_factory):
    """A real ACECal server (uvicorn on a free loopback port) serving the tiny trained bundle and the shipped models
    (``models/``: the hippocampus models, for the real sample case), with an API key."""
    pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, torch, monai) is needed")
    from live_server import LiveServer, make_settings

    settings = make_settings(
        tmp_path_factory.mktemp("slicer_server"),
        [tiny_bundle.parent, ROOT / "models"],
        api_key=SERVER_KEY,
        job_min_free_mb=1,
    )
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="session")
def client(server):
    """The extension's own copy of the client (ACECalibrationLib.client), as the module uses it."""
    from ACECalibrationLib.client import ACEClient

    with ACEClient(server.url, api_key=SERVER_KEY, timeout=(5.0, 120.0)) as c:
        yield c
