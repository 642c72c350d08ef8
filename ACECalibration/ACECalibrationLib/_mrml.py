"""Where the MRML and VTK classes come from.

Inside the 3D Slicer application everything lives in the ``slicer`` package (and the application's own VTK). In
plain Python the same classes come from the ``slicer-core`` wheel, importable as ``slicer_core`` (never as
``slicer``: an unrelated PyPI package of that name may shadow the namespace shim). The Lib imports MRML classes from
here only, so it never needs ``slicer.mrmlScene``, ``slicer.modules`` or Qt.
"""

from __future__ import annotations

import sys


def _load():
    app_slicer = sys.modules.get("slicer")
    if app_slicer is not None and hasattr(app_slicer, "app"):  # running inside the Slicer application
        return app_slicer
    try:
        import slicer_core

        return slicer_core
    except ImportError:  # pragma: no cover - Slicer application without a pre-imported ``slicer``
        import slicer

        return slicer


mrml = _load()

import vtk  # noqa: E402  (the same VTK the MRML classes were built against: the app's, or slicer-core's pinned 9.6.2)
from vtkmodules.util import numpy_support  # noqa: E402

__all__ = ["mrml", "vtk", "numpy_support"]
