"""A real ACECal server (uvicorn, FastAPI app from ``create_app``) on a free loopback port, for the HTTP tests.

``LiveServer(settings)`` runs uvicorn in a background thread of the test process (``uvicorn.Server.run``: the same
server ``acecal serve`` runs, bound to 127.0.0.1); ``start_cli_server`` runs the ``acecal serve`` command in a
subprocess. Tests talk HTTP to either; nothing is stubbed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, settings):
        import uvicorn

        from acecal.api.app import create_app

        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
        self.app = create_app(self.settings)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.settings.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn-{self.settings.port}", daemon=True)

    @property
    def state(self):
        return self.app.state.acecal

    def start(self, timeout: float = 30.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def make_settings(data_dir: Path, models_dirs, **kw):
    from acecal.api.settings import Settings

    return Settings(data_dir=data_dir, models_dirs=[str(m) for m in models_dirs], device="cpu", **kw)


def start_cli_server(args: list[str], env: Optional[dict] = None, timeout: float = 60.0):
    """``acecal serve ARGS --port <free>`` in a subprocess; returns (process, base URL) once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "acecal.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    e = dict(os.environ, **(env or {}))
    e.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"acecal serve exited with {proc.returncode}:\n{out}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError("acecal serve did not answer /health in time")


def stop_process(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read() if proc.stdout else ""
