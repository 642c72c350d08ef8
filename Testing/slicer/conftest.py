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
for _p in (MODULE_DIR, ROOT / "Testing"):  # ACECalibrationLib; the shared oblique.py, synthetic.py, live_server.py
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

pytest.importorskip("slicer_core", reason="slicer-core (pip install slicer-core==5.13.31053.0) is needed for the Slicer tests")


@pytest.fixture
def scene():
    """A fresh MRML scene with the segmentations logic registered."""
    from ACECalibrationLib.nodes import new_scene

    s = new_scene()
    yield s
    s.Clear(1)
