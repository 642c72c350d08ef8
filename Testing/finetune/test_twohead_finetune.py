"""Fine-tuning a two-head model (what ``hippocampus-ace``, the default model, is) through a real server: the ACE loss
asked for goes on the calibration head, the segmentation head keeps Dice + CE; a loss without a calibration term is
refused up front with the losses that fit."""

from __future__ import annotations

import pytest
from live_server import LiveServer, make_settings
from synthetic import make_dataset
from tiny_training import TINY_NETWORK_ARGS, train_tiny_bundle

from acecal.bundles import Bundle, NetworkConfig
from acecal.client import ACEClient
from acecal.errors import InvalidInputError


@pytest.fixture(scope="module")
def twohead_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("twohead-ft")
    path = train_tiny_bundle(
        root,
        model_id="tiny-twohead",
        epochs=4,
        loss="twohead_dice_ce_softace",
        network=NetworkConfig(name="SegResNetTwoHead", args={**TINY_NETWORK_ARGS, "trunk_grad": 0.0}),
    )
    cases = make_dataset(root / "cases", 4, layout="folders", seed=11)
    settings = make_settings(root / "server", [path.parent], job_min_free_mb=1)
    with LiveServer(settings) as server, ACEClient(server.url, timeout=(5.0, 120.0)) as client:
        ds = client.upload_dataset(cases / "images", cases / "labels", name="spheres", model="tiny-twohead")["id"]
        yield client, ds, root


def test_an_ace_loss_fine_tunes_the_calibration_head_of_a_two_head_model(twohead_server):
    client, ds, root = twohead_server
    acc = client.finetune("tiny-twohead", ds, loss="hardl1ace_dice_ce", epochs=1, val_every=1)
    job = client.wait_job(acc["job_id"], timeout=150, poll_s=2)
    assert job["status"] == "succeeded", job
    assert job["loss"] == "twohead_dice_ce_hardace"  # the loss trained, not only the one asked for
    new = next(m for m in client.models() if m.id == acc["model_id"])
    assert new.loss == "twohead_dice_ce_hardace"
    bundle = Bundle.load(root / "server" / "models" / acc["model_id"])
    assert bundle.config.network.name == "SegResNetTwoHead" and bundle.config.parent == "tiny-twohead"


def test_a_loss_without_calibration_term_is_refused_up_front(twohead_server):
    client, ds, _ = twohead_server
    with pytest.raises(InvalidInputError, match="two-head loss"):  # the client's class for a 422
        client.finetune("tiny-twohead", ds, loss="baseline_dice_ce", epochs=1)
    assert not [j for j in client.jobs() if j["base_model"] == "tiny-twohead" and j["loss"] == "baseline_dice_ce"]
