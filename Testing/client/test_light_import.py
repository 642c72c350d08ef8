"""The client imports and works with neither torch, monai, SimpleITK, scipy, FastAPI nor pydantic (3D Slicer's case)."""

import subprocess
import sys
import textwrap
from pathlib import Path

SERVER_DIR = str(Path(__file__).resolve().parents[2] / "server")
BLOCKED = [
    "torch",
    "monai",
    "SimpleITK",
    "scipy",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "matplotlib",
    "safetensors",
    "nibabel",
]


def test_client_imports_without_heavy_modules():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SERVER_DIR!r})
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # any import of it now raises ImportError
        import numpy as np
        import acecal.client as c
        from acecal.client import ACEClient, InferenceResult, Grid, ServerUnreachableError
        from acecal.nrrd import encode_nrrd, decode_nrrd
        g = Grid.from_zyx_shape((2, 3, 4), (1, 2, 3), (4, 5, 6))
        v = decode_nrrd(encode_nrrd(np.ones(g.shape_zyx, np.float32), g, encoding="gzip"))
        assert v.grid.same_as(g)
        client = ACEClient("127.0.0.1:9", timeout=(0.5, 0.5), retries=0)
        try:
            client.health()
        except ServerUnreachableError as e:
            print("unreachable:", e)
        loaded = [m for m in {BLOCKED!r} if sys.modules.get(m) is not None]
        assert not loaded, loaded
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "unreachable:" in r.stdout


def test_cli_help_and_remote_commands_need_no_heavy_modules():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SERVER_DIR!r})
        for name in ["torch", "monai", "SimpleITK", "scipy", "fastapi", "uvicorn"]:
            sys.modules[name] = None
        import acecal.cli.remote, acecal.cli.serve  # registering commands imports nothing heavy
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
