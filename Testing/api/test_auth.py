"""With an API key, every endpoint but /health needs 'Authorization: Bearer <key>' (401 otherwise)."""

import pytest
import requests
from live_server import LiveServer, make_settings
from synthetic import make_case, write_case

from acecal.api.auth import keys_match
from acecal.client import ACEClient, UnauthorizedError

KEY = "s3cret-key-0123456789"


@pytest.fixture(scope="module")
def secured(tiny_bundle, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("auth-data"), [tiny_bundle.parent], api_key=KEY)
    with LiveServer(settings) as s:
        yield s


def test_health_needs_no_key(secured):
    r = requests.get(secured.url + "/health", timeout=5)
    assert r.status_code == 200 and r.json()["auth_required"] is True


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/models"),
        ("GET", "/models/tiny-sphere"),
        ("GET", "/models/tiny-sphere/card"),
        ("POST", "/infer/tiny-sphere"),
        ("GET", "/results/" + "0" * 32),
        ("GET", "/results/" + "0" * 32 + "/files/labels"),
        ("DELETE", "/results/" + "0" * 32),
    ],
)
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic czNjcmV0", "Bearer ", "bearer s3cret-key-"])
def test_everything_else_needs_the_key(secured, method, path, header):
    headers = {"Authorization": header} if header is not None else {}
    r = requests.request(method, secured.url + path, headers=headers, timeout=10)
    assert r.status_code == 401, (method, path, header, r.text)
    assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"


def test_the_right_key_works_end_to_end(secured, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(secured.url + "/models", headers=auth, timeout=5).status_code == 200
    case = make_case((16, 16, 16), seed=8)
    write_case(case, tmp_path / "c.nrrd")
    with ACEClient(secured.url, api_key=KEY) as c:
        res = c.infer(tmp_path / "c.nrrd", "tiny-sphere")
        assert res.label_map.shape == (16, 16, 16)
    with ACEClient(secured.url, api_key="wrong") as c:
        assert c.health()["auth_required"] is True
        with pytest.raises(UnauthorizedError, match="refused"):
            c.check()


def test_openapi_declares_the_bearer_scheme_only_when_a_key_is_set(secured, server):
    spec = requests.get(secured.url + "/openapi.json", timeout=5).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" in spec["paths"]["/models"]["get"] and "security" not in spec["paths"]["/health"]["get"]
    open_spec = requests.get(server.url + "/openapi.json", timeout=5).json()
    assert "securitySchemes" not in open_spec.get("components", {})


def test_constant_time_comparison_helper():
    assert keys_match("abc", "abc") and not keys_match("abc", "abd") and not keys_match("", "abc")


def test_keys_must_be_header_safe(tmp_path):
    with pytest.raises(ValueError, match="printable ASCII"):
        make_settings(tmp_path, [], api_key="caf\u00e9 key")
    assert make_settings(tmp_path, [], api_key="").api_key is None
