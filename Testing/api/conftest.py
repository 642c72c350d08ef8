"""A real server (uvicorn on a free loopback port) serving the tiny trained bundle, shared by the API tests."""

import pytest
from live_server import LiveServer, make_settings


@pytest.fixture(scope="session")
def server(tiny_bundle, tmp_path_factory):
    with LiveServer(make_settings(tmp_path_factory.mktemp("api-data"), [tiny_bundle.parent])) as s:
        yield s


@pytest.fixture
def assert_no_temp_files(server):
    """After the test the server holds no temporary upload."""
    yield
    leftovers = list(server.settings.tmp_dir.iterdir())
    assert leftovers == [], leftovers
