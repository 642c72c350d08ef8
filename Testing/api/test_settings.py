"""Server settings from ACECAL_ environment variables, with flag values overriding them."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from acecal.api.settings import Settings


def test_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("ACECAL_PORT", "9123")
    monkeypatch.setenv("ACECAL_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("ACECAL_MODELS_DIRS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    monkeypatch.setenv("ACECAL_API_KEY", "k-123")
    monkeypatch.setenv("ACECAL_QUEUE_SIZE", "0")
    monkeypatch.setenv("ACECAL_CORS_ORIGINS", "http://a, http://b")
    s = Settings()
    assert s.port == 9123 and s.data_dir == tmp_path / "d" and s.queue_size == 0
    assert s.models_dirs == [tmp_path / "a", tmp_path / "b"]
    assert s.api_key.get_secret_value() == "k-123" and "k-123" not in repr(s)
    assert s.cors_origins == ["http://a", "http://b"]
    assert s.results_dir == tmp_path / "d" / "results" and s.user_models_dir == tmp_path / "d" / "models"
    # explicit values (the CLI flags) win over the environment
    assert Settings(port=8001, api_key=None).port == 8001


def test_defaults_work_without_configuration(monkeypatch):
    for k in ("ACECAL_PORT", "ACECAL_DATA_DIR", "ACECAL_MODELS_DIRS", "ACECAL_API_KEY", "ACECAL_HOST"):
        monkeypatch.delenv(k, raising=False)
    s = Settings()
    assert s.host == "127.0.0.1" and s.port == 8000 and s.api_key is None and s.device == "auto"
    assert s.data_dir == Path.home() / ".acecal" and s.models_dirs[0].name == "models"
    assert s.max_upload_bytes == 2048 * 1024 * 1024 and s.result_ttl_s == 3600


@pytest.mark.parametrize("bad", [{"port": 70000}, {"queue_size": -1}, {"max_upload_mb": 0}, {"result_ttl_s": 0}])
def test_invalid_values_are_refused(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)
