"""A run's work directory: checkpoints written whole, the resume check, the random state that makes a resume exact."""

import pickle
import random

import numpy as np
import pytest
import torch

from acecal.training.checkpoints import (
    LAST,
    ResumeError,
    epoch_seed,
    load_checkpoint,
    resumable_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_a_checkpoint_is_written_whole_and_leaves_no_temporary_file(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "history": [{"epoch": 1}]}
    save_checkpoint(state, tmp_path / LAST)
    save_checkpoint({**state, "epoch": 4}, tmp_path / LAST)  # replaced, not appended to
    back = load_checkpoint(tmp_path / LAST)
    assert back["epoch"] == 4 and torch.equal(back["model"]["w"], state["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / LAST)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # AttributeError: "Can't pickle local object"
        save_checkpoint({"epoch": 2, "unpicklable": lambda: None}, tmp_path / LAST)
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


def test_resume_is_checked_against_the_interrupted_runs_settings(tmp_path):
    settings = {"lr": 0.01, "loss": "hardl1ace_dice_ce", "model_id": "a"}
    assert resumable_state(tmp_path, settings, resume=True) is None  # nothing to resume: a fresh run
    save_checkpoint({"epoch": 2, "config": settings}, tmp_path / LAST)
    assert resumable_state(tmp_path, {**settings, "model_id": "b"}, resume=True)["epoch"] == 2  # the id may change
    with pytest.raises(ResumeError, match="lr"):
        resumable_state(tmp_path, {**settings, "lr": 0.001}, resume=True)
    with pytest.raises(ResumeError, match="--resume"):
        resumable_state(tmp_path, settings, resume=False)


def test_restored_random_state_repeats_the_same_draws():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    st = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    set_rng_state(st)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_epoch_seeds_depend_on_seed_epoch_and_rank_only():
    assert epoch_seed(12345, 3, 0) == epoch_seed(12345, 3, 0)
    assert len({epoch_seed(12345, e, r) for e in range(4) for r in range(2)} | {epoch_seed(1, 0, 0)}) == 9
