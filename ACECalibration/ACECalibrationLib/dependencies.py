"""Getting the light ``acecal`` client into Slicer's Python (no torch, no monai: requests + numpy).

Slicer never runs the models; it only talks to a server. The client comes from the extension's own copy, in this
order:

1. already importable (installed before, or ``PythonSlicer -m pip install /path/to/ACECalibration``);
2. a wheel shipped with the extension (``Resources/wheels/acecal-*.whl``, built from the same source when the
   extension is built);
3. the source checkout this module sits in (``<repo>/ACECalibration/`` next to ``<repo>/pyproject.toml``), as when
   Slicer is started with ``--additional-module-paths <repo>/ACECalibration``: developer mode, nothing is installed,
   ``<repo>/server`` is put on ``sys.path`` (:func:`use_checkout`), so the module runs the checkout's client as is.

For a wheel the module passes :func:`client_requirements` to ``slicer.packaging.pip_ensure`` (which asks the user
first and skips what is already satisfied). Nothing here imports ``acecal`` or Slicer, so it runs before either is
available.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["client_available", "client_source", "client_requirements", "read_requirements", "use_checkout"]


def client_available() -> bool:
    """True when ``acecal.client`` can be imported."""
    try:
        return importlib.util.find_spec("acecal") is not None and importlib.util.find_spec("acecal.client") is not None
    except (ImportError, ValueError):
        return False


def _is_acecal_checkout(root: Path) -> bool:
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or not (root / "server" / "acecal" / "client").is_dir():
        return False
    return 'name = "acecal"' in pyproject.read_text(encoding="utf-8", errors="replace")


def client_source(module_dir: str | Path) -> Path | None:
    """Where to install the client from: a bundled wheel or the enclosing source checkout (None if neither)."""
    module_dir = Path(module_dir).resolve()
    wheels = sorted((module_dir / "Resources" / "wheels").glob("acecal-*.whl"))
    if wheels:
        return wheels[-1]
    for root in (module_dir.parent, module_dir.parent.parent):
        if _is_acecal_checkout(root):
            return root
    return None


def use_checkout(module_dir: str | Path) -> bool:
    """Developer mode: when the module sits in a source checkout, put its ``server/`` on ``sys.path``.

    Returns True when ``acecal.client`` is importable afterwards.
    """
    import sys

    source = client_source(module_dir)
    if source is None or source.is_file():
        return client_available()
    server = str(source / "server")
    if server not in sys.path:
        sys.path.insert(0, server)
    importlib.invalidate_caches()
    return client_available()


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file (comments and blanks dropped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def client_requirements(module_dir: str | Path) -> list[str]:
    """Requirement strings for ``pip_ensure``: the run-time needs in ``Resources/requirements.txt`` plus the client.

    Raises RuntimeError with instructions when no copy of the client can be found.
    """
    module_dir = Path(module_dir)
    reqs = read_requirements(module_dir / "Resources" / "requirements.txt")
    source = client_source(module_dir)
    if source is None:
        if client_available():
            return reqs
        raise RuntimeError(
            "The ACECalibration client (Python package 'acecal') is not installed and no copy of it was found next "
            "to the module. Install it into Slicer's Python with: PythonSlicer -m pip install /path/to/ACECalibration"
        )
    return reqs + [f"acecal @ {source.resolve().as_uri()}"]
