"""Fine-tuning through a real server: a shared uvicorn server on loopback serving the tiny trained bundle, synthetic
labelled cases on disk, and helpers to follow jobs. Nothing is stubbed: jobs are real processes training real
(tiny) networks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from live_server import LiveServer, make_settings
from synthetic import make_dataset

from acecal.client import ACEClient

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `from ftutil import ...` in the tests (--import-mode=importlib)
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="session")
def cases_dir(tmp_path_factory):
    """Four labelled synthetic cases: ``images/case_00i.nii.gz`` + ``labels/case_00i.nii.gz`` (2 classes, 24^3)."""
    return make_dataset(tmp_path_factory.mktemp("ft-cases"), 4, layout="folders", seed=7)


@pytest.fixture(scope="session")
def ft_server(tiny_bundle, tmp_path_factory):
    """A server with a job queue of one (the second waiting job gets 503)."""
    settings = make_settings(
        tmp_path_factory.mktemp("ft-data"), [tiny_bundle.parent], job_queue_size=1, job_min_free_mb=1
    )
    with LiveServer(settings) as s:
        yield s


@pytest.fixture
def client(ft_server):
    with ACEClient(ft_server.url, timeout=(5.0, 120.0)) as c:
        yield c


@pytest.fixture(scope="session")
def dataset_id(ft_server, cases_dir):
    """The four cases uploaded once, checked against the tiny model's labels."""
    with ACEClient(ft_server.url) as c:
        return c.upload_dataset(cases_dir / "images", cases_dir / "labels", name="spheres", model="tiny-sphere")["id"]
