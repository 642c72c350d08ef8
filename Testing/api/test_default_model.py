"""The server's default model (``default_model``, ACECAL_DEFAULT_MODEL): /health says which, /models marks it, POST
/infer without a model id runs it, the client's ``infer(image)`` too; an id that is not served falls back to the first
model /models lists, and the log says so."""

import logging

import pytest
import requests
from live_server import LiveServer, make_settings
from slow_model import copy_bundle
from synthetic import dice, make_case, write_case

from acecal.client import ACEClient, ModelNotFoundError
from acecal.protocol import HEALTH_DEFAULT_MODEL, HEALTH_DEFAULT_MODEL_CONFIGURED, ModelInfo

SECOND = "tiny-second"


@pytest.fixture(scope="module")
def two_models(tiny_bundle, tmp_path_factory):
    """A models folder holding the tiny bundle and a copy of it as ``tiny-second`` (listed after it)."""
    extra = tmp_path_factory.mktemp("second-models")
    copy_bundle(tiny_bundle, extra, SECOND)
    return [tiny_bundle.parent, extra]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    c = make_case((24, 24, 24), seed=12)
    path = tmp_path_factory.mktemp("default-case") / "case.nii.gz"
    write_case(c, path)
    return path, c.label


def models_reply(url):
    r = requests.get(url + "/models", timeout=30)
    assert r.status_code == 200, r.text
    return [ModelInfo.from_json(m) for m in r.json()["models"]]


def test_the_configured_default_is_reported_marked_and_run(two_models, case, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACECAL_DEFAULT_MODEL", SECOND)
    caplog.set_level(logging.INFO, logger="acecal.api")
    with LiveServer(make_settings(tmp_path / "data", two_models)) as s:
        health = requests.get(s.url + "/health", timeout=10).json()
        assert health[HEALTH_DEFAULT_MODEL] == health[HEALTH_DEFAULT_MODEL_CONFIGURED] == SECOND
        models = models_reply(s.url)
        assert [m.id for m in models] == ["tiny-sphere", SECOND]  # not the first listed: the setting decides
        assert [m.default for m in models] == [False, True]
        assert ModelInfo.from_json(requests.get(f"{s.url}/models/{SECOND}", timeout=10).json()).default
        assert not ModelInfo.from_json(requests.get(f"{s.url}/models/tiny-sphere", timeout=10).json()).default

        path, label = case
        with open(path, "rb") as fh:  # POST /infer: no model id in the path
            r = requests.post(s.url + "/infer", files={"image": (path.name, fh)}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model_id"] == SECOND

        with ACEClient(s.url) as c:
            assert c.default_model().id == SECOND
            result = c.infer(path)  # model_id=None: the server's default
            assert result.model_id == SECOND and dice(result.label_map, label) > 0.9
            assert c.infer(path, "tiny-sphere").model_id == "tiny-sphere"  # a named model still wins
    assert f"default model: {SECOND}" in caplog.text


def test_a_default_that_is_not_served_falls_back_to_the_first_model(two_models, case, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACECAL_DEFAULT_MODEL", "hippocampus-nowhere")
    caplog.set_level(logging.INFO, logger="acecal.api")
    with LiveServer(make_settings(tmp_path / "data", two_models)) as s:
        health = requests.get(s.url + "/health", timeout=10).json()
        assert health[HEALTH_DEFAULT_MODEL_CONFIGURED] == "hippocampus-nowhere"
        assert health[HEALTH_DEFAULT_MODEL] == "tiny-sphere"  # the first model /models lists
        assert [m.id for m in models_reply(s.url) if m.default] == ["tiny-sphere"]
        with ACEClient(s.url) as c:
            assert c.infer(case[0]).model_id == "tiny-sphere"
    assert "default model 'hippocampus-nowhere' is not served: using 'tiny-sphere'" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "not served" in r.getMessage()]
    assert len(warnings) == 1  # said once, at start-up, not on every request


def test_without_models_there_is_no_default_and_infer_says_so(case, tmp_path):
    (tmp_path / "empty").mkdir()
    with LiveServer(make_settings(tmp_path / "data", [tmp_path / "empty"])) as s:
        health = requests.get(s.url + "/health", timeout=10).json()
        assert health[HEALTH_DEFAULT_MODEL] is None and health[HEALTH_DEFAULT_MODEL_CONFIGURED] == "hippocampus-ace"
        with ACEClient(s.url) as c:
            assert c.default_model() is None
            with pytest.raises(ModelNotFoundError, match="no model"):
                c.infer(case[0])
        assert list(s.settings.tmp_dir.iterdir()) == []  # refused before the upload was read


def test_a_model_published_later_becomes_the_default_without_a_restart(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("ACECAL_DEFAULT_MODEL", SECOND)
    models = tmp_path / "models"
    models.mkdir()
    with LiveServer(make_settings(tmp_path / "data", [tiny_bundle.parent, models])) as s:
        assert requests.get(s.url + "/health", timeout=10).json()[HEALTH_DEFAULT_MODEL] == "tiny-sphere"
        copy_bundle(tiny_bundle, models, SECOND)  # e.g. a fine-tuning job publishing it
        assert requests.get(s.url + "/health", timeout=10).json()[HEALTH_DEFAULT_MODEL] == SECOND
        assert [m.id for m in models_reply(s.url) if m.default] == [SECOND]
