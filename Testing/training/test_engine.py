"""The training engine on tiny synthetic volumes: real training, a few seconds per run, no mocks."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file
from synthetic import make_dataset

from acecal.bundles import Bundle, ModelRegistry, NetworkConfig
from acecal.training.config import TrainConfig
from acecal.training.engine import LAST, Engine, ResumeError, encoder_modules
from acecal.training.finetune import finetune
from acecal.training.progress import read_log

TINY_NET = NetworkConfig(name="SegResNet", args={"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]})


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """6 cases of 16^3 in the images/ + labels/ layout."""
    return make_dataset(tmp_path_factory.mktemp("small") / "ds", 6, shape_zyx=(16, 16, 16), seed=3)


def cfg(tmp_path, data, **kw):
    base = dict(
        data=str(data),
        network=TINY_NET,
        roi_size=(16, 16, 16),
        epochs=2,
        batch_size=2,
        num_samples=1,
        lr=1e-2,
        warmup_epochs=1,
        val_fraction=0.34,
        val_every=1,
        out_dir=str(tmp_path / "models"),
        work_dir=str(tmp_path / "work"),
        model_id="m1",
        sw_batch_size=1,
        augment=True,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_gives_identical_weights(tmp_path, small_data):
    full = Engine(cfg(tmp_path / "a", small_data, publish=False), show_progress=False).run()
    assert full.status == "completed" and full.epochs_done == 2

    first = Engine(cfg(tmp_path / "b", small_data, publish=False, stop_after_epochs=1), show_progress=False).run()
    assert first.status == "stopped" and first.epochs_done == 1
    second = Engine(cfg(tmp_path / "b", small_data, publish=False, resume=True), show_progress=False).run()
    assert second.status == "completed" and second.epochs_done == 2

    wa, wb = weights(tmp_path / "a" / "work" / LAST), weights(tmp_path / "b" / "work" / LAST)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha = [(h["train_loss"], h["val"]) for h in full.history]
    hb = [(h["train_loss"], h["val"]) for h in second.history]
    assert ha == hb
    ck = torch.load(tmp_path / "b" / "work" / LAST, map_location="cpu", weights_only=False)
    assert {"optimizer", "scheduler", "rng", "epoch", "history", "best"} <= ck.keys()


def test_resume_refuses_changed_settings_and_existing_runs(tmp_path, small_data):
    Engine(cfg(tmp_path, small_data, publish=False, epochs=2, stop_after_epochs=1), show_progress=False).run()
    with pytest.raises(ResumeError, match="lr"):
        Engine(cfg(tmp_path, small_data, publish=False, resume=True, lr=1e-3), show_progress=False).run()
    with pytest.raises(ResumeError, match="--resume"):
        Engine(cfg(tmp_path, small_data, publish=False), show_progress=False).run()


def test_extending_a_finished_run_restarts_the_cosine(tmp_path, small_data):
    first = Engine(cfg(tmp_path, small_data, publish=False, epochs=2), show_progress=False).run()
    assert first.status == "completed" and first.history[-1]["epoch"] == 2
    res = Engine(cfg(tmp_path, small_data, epochs=4, resume=True), show_progress=False).run()
    assert res.status == "published" and res.epochs_done == 4
    lrs = {r["epoch"]: r["lr"] for r in read_log(tmp_path / "work" / "train.jsonl") if r["event"] == "epoch"}
    # epoch 3 runs at the 4-epoch cosine's value for step 2 (warm-up 1, lr 1e-2): 1e-2 * (1 + cos(pi / 3)) / 2,
    # not at the 2-epoch schedule's final 0
    assert lrs[3] == pytest.approx(1e-2 * 0.75) and lrs[4] < lrs[3]
    b = Bundle.load(res.bundle_path)
    assert [h["epochs"] for h in b.config.training["history"]] == [2, 2, 4, 4]
    assert "extended from 2 to 4 epochs after epoch 2" in b.card_path.read_text()


def test_publish_log_and_callback(tmp_path, small_data):
    events = []
    res = Engine(cfg(tmp_path, small_data, epochs=2, val_every=2), progress=events.append, show_progress=False).run()
    assert res.status == "published" and res.bundle_path == tmp_path / "models" / "m1"
    assert ModelRegistry([tmp_path / "models"]).ids() == ["m1"]
    b = Bundle.load(res.bundle_path)
    assert b.config.metrics["dice"] is not None and b.config.training["epochs"] == 2
    assert b.config.loss.name == "baseline_dice_ce" and b.config.parent is None

    log = read_log(tmp_path / "work" / "train.jsonl")
    kinds = [r["event"] for r in log]
    assert kinds == ["start", "epoch", "epoch", "published"]
    e1, e2 = log[1], log[2]
    assert e1["epoch"] == 1 and e1["val"] is None and e1["seconds"] > 0 and e1["lr"] > 0
    assert isinstance(e1["train_loss"], float)
    assert set(e2["val"]) == {"dice", "ace", "ece", "mce"} and e2["best_epoch"] == 2
    assert log[3]["model_id"] == "m1"
    steps = [e for e in events if e["event"] == "step"]
    assert steps and steps[0]["steps"] == 2 and {e["event"] for e in events} >= {"start", "epoch", "published"}


def test_cancel_stops_without_publishing(tmp_path, small_data):
    stop = threading.Event()

    def hook(e):
        if e["event"] == "step" and e["epoch"] == 2:
            stop.set()

    res = Engine(cfg(tmp_path, small_data, epochs=3), progress=hook, cancel=stop, show_progress=False).run()
    assert res.status == "cancelled" and res.bundle_path is None and res.epochs_done == 1
    assert not (tmp_path / "models" / "m1").exists()
    assert torch.load(tmp_path / "work" / LAST, map_location="cpu", weights_only=False)["epoch"] == 1
    assert read_log(tmp_path / "work" / "train.jsonl")[-1]["event"] == "stopped"
    # a callable works as a token too, and the cancelled run can be resumed to completion
    res = Engine(cfg(tmp_path, small_data, epochs=3, resume=True), cancel=lambda: False, show_progress=False).run()
    assert res.status == "published" and res.epochs_done == 3


def test_finetune_with_frozen_encoder(tmp_path, tiny_bundle):
    data = make_dataset(tmp_path / "ft", 4, shape_zyx=(24, 24, 24), seed=11)
    base = Bundle.load(tiny_bundle)
    reg = ModelRegistry([tiny_bundle.parent])
    res = finetune(
        "tiny-sphere",
        registry=reg,
        freeze_encoder=True,
        data=str(data),
        epochs=2,
        lr=1e-3,
        val_fraction=0.25,
        out_dir=str(tmp_path / "models"),
        work_dir=str(tmp_path / "work"),
        model_id="tiny-ft",
        batch_size=2,
        num_samples=1,
    )
    assert res.status == "published"
    new = Bundle.load(res.bundle_path)
    assert new.id == "tiny-ft" and new.config.parent == "tiny-sphere"
    assert new.config.labels == base.config.labels and new.config.network == base.config.network
    assert "fine-tuned from `tiny-sphere`" in new.card_path.read_text()
    old_net, new_net = base.load_network(), new.load_network()
    enc_old = {k: v for m in encoder_modules(old_net) for k, v in m.state_dict().items()}
    enc_new = {k: v for m in encoder_modules(new_net) for k, v in m.state_dict().items()}
    assert enc_old and all(torch.equal(enc_old[k], enc_new[k]) for k in enc_old)
    sd_old, sd_new = old_net.state_dict(), new_net.state_dict()
    changed = [k for k in sd_old if not torch.equal(sd_old[k], sd_new[k])]
    assert changed and all(not k.startswith(("convInit", "down_layers")) for k in changed)
    # the base bundle is untouched
    assert json.loads((tiny_bundle / "bundle.json").read_text())["id"] == "tiny-sphere"


@pytest.mark.parametrize("loss", ["hardl1ace_dice_ce", "softl1ace_dice_ce", "labelsmooth_dice_ce", "nacl_dice"])
def test_every_registry_loss_trains(tmp_path, small_data, loss):
    res = Engine(cfg(tmp_path, small_data, loss=loss, epochs=1, val_fraction=0.0), show_progress=False).run()
    assert res.status == "published"
    b = Bundle.load(res.bundle_path)
    assert b.config.loss.name == loss and b.config.metrics == {}
    assert "not been measured" in b.card_path.read_text()
    assert torch.isfinite(torch.tensor(res.history[0]["train_loss"]))


def test_fit_temperature_and_loss_params(tmp_path, small_data):
    res = Engine(
        cfg(
            tmp_path,
            small_data,
            loss="hardl1ace_dice_ce",
            loss_params={"ace_weight": 0.5},
            epochs=2,
            fit_temperature=True,
            half_precision=True,
        ),
        show_progress=False,
    ).run()
    b = Bundle.load(res.bundle_path)
    wt = b.config.metrics["with_temperature"]
    assert 0.05 <= wt["temperature"] <= 20 and wt["dice"] == pytest.approx(b.config.metrics["dice"])
    # the fitted temperature is stored (applied at inference) exactly when it lowers the validation ACE
    assert wt["applied"] == (wt["ace"] < b.config.metrics["ace"])
    assert b.config.temperature == (wt["temperature"] if wt["applied"] else None)
    assert b.config.loss.params == {"ace_weight": 0.5}
    card = b.card_path.read_text()
    assert "+ temperature" in card and "`hardl1ace_dice_ce` with `ace_weight=0.5`" in card
    assert all(t.dtype == torch.float16 for t in load_file(str(b.weights_path)).values() if t.is_floating_point())
    b.load_network()  # float16 weights load back into the float32 network


def test_sizes_must_fit_the_network(tmp_path, small_data):
    with pytest.raises(Exception, match="patch size 15x16x16 must be divisible by 2"):
        Engine(cfg(tmp_path, small_data, patch_size=(15, 16, 16)), show_progress=False).run()
    assert not (tmp_path / "work" / LAST).exists()


def test_patch_smaller_than_roi(tmp_path, small_data):
    res = Engine(
        cfg(tmp_path, small_data, epochs=1, patch_size=(8, 8, 8), roi_size=(16, 16, 16), val_every=1),
        show_progress=True,
    ).run()  # the tqdm bar path too
    b = Bundle.load(res.bundle_path)
    assert b.config.roi_size == (16, 16, 16) and b.config.training["patch_size"] == [8, 8, 8]


def test_loss_warmup_trains_the_baseline_first(tmp_path, small_data):
    """ACE after a Dice+CE warm-up: epoch 1 is the baseline's epoch 1 exactly, epoch 2 uses the ACE loss."""
    base = Engine(cfg(tmp_path / "a", small_data, publish=False, loss="baseline_dice_ce"), show_progress=False).run()
    warm = Engine(
        cfg(tmp_path / "b", small_data, loss="softl1ace_dice_ce", loss_warmup_epochs=1), show_progress=False
    ).run()
    assert warm.history[0]["train_loss"] == base.history[0]["train_loss"]
    assert warm.history[1]["train_loss"] != base.history[1]["train_loss"]
    b = Bundle.load(warm.bundle_path)
    assert b.config.training["loss"]["warmup_epochs"] == 1
    assert b.config.training["best_epoch"] == 2  # never a warm-up epoch's weights
    assert "switched on after 1 epochs of `baseline_dice_ce`" in b.card_path.read_text()
