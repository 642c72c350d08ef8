"""A real server (uvicorn on a free loopback port) serving the tiny trained bundle, for the client tests."""

import pytest
from live_server import LiveServer, make_settings


@pytest.fixture(scope="session")
def client_server(tiny_bundle, tmp_path_factory):
    with LiveServer(make_settings(tmp_path_factory.mktemp("client-data"), [tiny_bundle.parent])) as s:
        yield s
