#!/usr/bin/env python3
"""Generate ``ACECalibrationLib/client/``: the extension's own copy of the light ``acecal`` client.

3D Slicer must not pip-install anything, so the module carries the client (HTTP client, wire protocol, errors,
geometry, NRRD codec: numpy + requests, both shipped with Slicer) as a sub-package of its Lib. The copy is
*generated* from ``server/acecal``: every file in :data:`SOURCES` is copied unchanged except that its ``acecal``
imports become relative imports inside the flat package ``ACECalibrationLib.client``, and a one-line header names the
source.

This list is the one place that says what the light client is made of. It is read by

- CMake, at build time: the generated package goes into the build tree and the extension package
  (``ACECalibration/CMakeLists.txt``);
- the identity test (``Testing/slicer/test_light_client_copy.py``): the committed copy equals a fresh generation;
- developers: run it after changing any listed source (``--check`` only compares).

    python ACECalibration/CMake/generate_light_client.py            # rewrite ACECalibration/ACECalibrationLib/client
    python ACECalibration/CMake/generate_light_client.py --check    # exit 1 when the committed copy is stale
    python ACECalibration/CMake/generate_light_client.py --source server/acecal --out build/.../client

Standard library only, Python 3.9+ (it runs under Slicer's own Python during an extension build).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_SOURCE = ROOT / "server" / "acecal"
DEFAULT_OUT = ROOT / "ACECalibration" / "ACECalibrationLib" / "client"

#: (file under server/acecal, module name in the flat copy). The package's own ``__init__`` becomes ``_acecal``
#: (it holds ``__version__``); ``client/__init__.py`` becomes the copy's ``__init__``.
SOURCES = (
    ("__init__.py", "_acecal"),
    ("errors.py", "errors"),
    ("geometry.py", "geometry"),
    ("nrrd.py", "nrrd"),
    ("protocol.py", "protocol"),
    ("client/transport.py", "transport"),
    ("client/results.py", "results"),
    ("client/resources.py", "resources"),
    ("client/client.py", "client"),
    ("client/__init__.py", "__init__"),
)

HEADER = "# Generated from server/acecal/{source} by ACECalibration/CMake/generate_light_client.py: edit the source.\n"

_FROM = re.compile(r"from[ \t]+(?P<module>acecal(?:\.\w+)*)[ \t]+import\b")


class GenerationError(RuntimeError):
    """A listed source cannot be copied as it is (it imports something outside the list, or a file is missing)."""


def dotted_name(source: str) -> str:
    """``client/client.py`` -> ``acecal.client.client``; ``__init__.py`` -> ``acecal``."""
    parts = ["acecal"] + source[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_map(sources=SOURCES) -> dict:
    """``acecal`` dotted module name -> module name in the copy (``__init__`` = the package itself)."""
    names = [target for _, target in sources]
    if len(set(names)) != len(names):
        raise GenerationError(f"two sources map to the same module in the copy: {names}")
    return {dotted_name(src): target for src, target in sources}


def rewrite(text: str, source: str, modules: dict) -> str:
    """The copy of one source: each statement ``from acecal.x import y`` -> ``from .x' import y`` (found with
    :mod:`ast`, so docstrings and comments stay as they are); a header line first."""
    lines = text.splitlines(keepends=True)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "acecal" for a in node.names):
            raise GenerationError(
                f"{source}, line {node.lineno}: 'import acecal...' cannot be made relative; "
                "use 'from acecal.x import y'"
            )
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "acecal"):
            continue
        if node.module not in modules:
            raise GenerationError(
                f"{source} imports {node.module}, which is not part of the light client "
                f"(SOURCES in {Path(__file__).name})"
            )
        target = modules[node.module]
        line = lines[node.lineno - 1]
        head, tail = line[: node.col_offset], line[node.col_offset :]
        match = _FROM.match(tail)
        if match is None:  # pragma: no cover - e.g. a backslash between "from" and the module name
            raise GenerationError(f"{source}, line {node.lineno}: cannot rewrite {line.strip()!r}")
        where = "." if target == "__init__" else "." + target
        lines[node.lineno - 1] = head + f"from {where} import" + tail[match.end() :]
    return HEADER.format(source=source) + "".join(lines)


def generate(source_dir=DEFAULT_SOURCE, sources=SOURCES) -> dict:
    """File name in the copy -> its text."""
    source_dir = Path(source_dir)
    modules = module_map(sources)
    out = {}
    for src, target in sources:
        path = source_dir / src
        if not path.is_file():
            raise GenerationError(f"missing source {path}")
        out[f"{target}.py"] = rewrite(path.read_text(encoding="utf-8"), src, modules)
    return out


def differences(files: dict, out_dir) -> list:
    """What differs between the generated ``files`` and ``out_dir`` (stale, missing or extra ``.py`` files)."""
    out_dir = Path(out_dir)
    problems = []
    for name, text in files.items():
        path = out_dir / name
        if not path.is_file():
            problems.append(f"missing {name}")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"stale {name}")
    extra = sorted(p.name for p in out_dir.glob("*.py") if p.name not in files) if out_dir.is_dir() else []
    problems += [f"extra {name}" for name in extra]
    return problems


def write(files: dict, out_dir) -> None:
    """Write the copy into ``out_dir``, removing ``.py`` files that are no longer generated."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in out_dir.glob("*.py"):
        if path.name not in files:
            path.unlink()
    for name, text in files.items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:  # untouched files keep their time stamp
            with open(path, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the acecal package (server/acecal)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the package folder to write")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the copy differs")
    ap.add_argument("--list", action="store_true", help="print the generated file names and exit")
    args = ap.parse_args(argv)
    try:
        files = generate(args.source)
    except GenerationError as e:
        print(f"generate_light_client: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(files))
        return 0
    if args.check:
        problems = differences(files, args.out)
        for p in problems:
            print(f"{args.out}: {p}", file=sys.stderr)
        return 1 if problems else 0
    write(files, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
