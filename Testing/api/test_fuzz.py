"""A bounded schemathesis run (CLI ``st run``) against the live server: no 5xx, responses as documented."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import LiveServer, make_settings

KEY = "fuzz-key"


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(tiny_bundle, tmp_path):
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    if not Path(st).exists():
        pytest.skip("schemathesis CLI (st) is not installed")
    config = tmp_path / "schemathesis.toml"
    # fuzz the upload against the real model (random bytes must never reach a 5xx), other ids stay random
    config.write_text(
        '[[operations]]\ninclude-path = "/infer/{model_id}"\nparameters = { "model_id" = "tiny-sphere" }\n'
    )
    settings = make_settings(tmp_path / "data", [tiny_bundle.parent], api_key=KEY)
    with LiveServer(settings) as s:
        cmd = [
            st,
            "--config-file",
            str(config),
            "run",
            f"{s.url}/openapi.json",
            "--max-examples",
            "30",
            "--workers",
            "1",
            "--seed",
            "20261129",
            "--request-timeout",
            "30",
            "--header",
            f"Authorization: Bearer {KEY}",
            # every check except positive_data_acceptance: a schema-valid upload may still be a bad image (422)
            "--exclude-checks",
            "positive_data_acceptance",
            "--no-color",
            "--report-dir",
            str(tmp_path / "report"),
        ]
        env = dict(os.environ, SCHEMATHESIS_HOOKS="")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path, env=env)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        assert "passed" in out
        # and the server is still healthy, with no temporary files left behind
        assert list(s.settings.tmp_dir.iterdir()) == []
