"""acecal.inference.pipeline.run_inference: the one orchestration ``POST /infer`` and ``acecal infer`` share, with the
device stage behind a hook (the server's device queue) and running out of memory as a 413, in-process too."""

import numpy as np
import pytest

from acecal.bundles import Bundle
from acecal.data.headers import ImageLimits, image_limits
from acecal.errors import PayloadTooLargeError
from acecal.geometry import Grid
from acecal.inference.pipeline import InferenceOptions, run_inference
from acecal.inference.predictor import Predictor
from acecal.nrrd import write_nrrd


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor(Bundle.load(tiny_bundle), "cpu")


def _image(path, spacing: float, n: int = 16):
    arr = np.random.default_rng(3).random((n, n, n)).astype(np.float32)
    return write_nrrd(path, arr, Grid((n, n, n), (spacing,) * 3, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))


def test_the_device_stage_runs_through_the_hook_and_is_timed(predictor, tmp_path):
    image = _image(tmp_path / "img.nrrd", 1.0)
    calls = []

    def on_device(stage):
        calls.append(stage)
        return stage()

    hooked = run_inference(predictor, image, InferenceOptions(), name="scan.nrrd", run_on_device=on_device)
    plain = run_inference(predictor, image)
    assert len(calls) == 1  # exactly the forward pass
    assert "queue_wait_s" in hooked.report["timings"] and "queue_wait_s" not in plain.report["timings"]
    np.testing.assert_array_equal(hooked.labels, plain.labels)
    np.testing.assert_array_equal(hooked.confidence, plain.confidence)


def test_running_out_of_memory_is_a_413_in_process_too(predictor, tmp_path):
    """4^3 voxels of 10 m resample to ~6e13 voxels at the model's spacing: with the model-space budget off the
    allocation fails, and the caller gets the server's 413, not a MemoryError."""
    image = _image(tmp_path / "far.nrrd", 1e4, n=4)
    with image_limits(ImageLimits(10**9, 10**18)), pytest.raises(PayloadTooLargeError) as e:
        run_inference(predictor, image, name="far.nrrd")
    assert "the image 'far.nrrd' is too large for this server's memory" in e.value.detail
    assert e.value.http_status == 413 and e.value.__context__ is None
