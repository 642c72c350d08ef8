"""Memory budget: unique autograd-saved bytes per (voxel x class), softmax output included.

Budget (benchmarks/RESULTS.md), on logits (2, 4, 64, 64, 64) float32 with a label-map target: hard <= 6, soft <= 8.
Timings are not tested here; they belong to benchmarks/bench_losses.py.
"""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from acecal.losses import HardL1ACEandDiceCELoss, HardL1ACELoss, SoftL1ACELoss
from acecal.losses.binning import differentiable_hard_sums, differentiable_soft_sums
from acecal.losses.memory import saved_bytes_per_element


@pytest.fixture(scope="module")
def budget_case():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 64, 64, 64, generator=gen)
    labels = torch.randint(0, 4, (2, 1, 64, 64, 64), generator=gen)
    return logits, labels


@pytest.mark.parametrize("cls, budget", [(HardL1ACELoss, 6.0), (SoftL1ACELoss, 8.0)])
def test_saved_bytes_within_budget(budget_case, cls, budget):
    logits, labels = budget_case
    per_element = saved_bytes_per_element(cls(to_onehot_y=True, softmax=True), logits, labels)
    assert per_element <= budget, f"{cls.__name__} saves {per_element:.2f} B per element (budget {budget})"
    # the softmax output alone is 4 B per element: what the ACE term adds is small
    assert per_element >= 4.0


def test_saved_state_is_compact():
    # hard: one uint8 bin index per element; soft: nothing per element except what the caller passes (a uint8 copy
    # of a label map); neither keeps a float one-hot target
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2, 3, 1000, generator=gen), 1).requires_grad_()
    labels = torch.randint(0, 3, (2, 1, 1000), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        differentiable_hard_sums(probs, labels, 20, False, 0)
    assert sorted(saved) == [(torch.uint8, 6000)]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        differentiable_soft_sums(probs, labels, 20, 0)
    assert sorted(saved, key=str) == sorted([(torch.float32, 6000), (torch.uint8, 2000)], key=str)


def test_combined_loss_adds_little_to_dice_ce(budget_case):
    # ACE and Dice share one softmax and the label map is used directly by ACE: compared with MONAI's DiceCELoss the
    # paper's combined loss keeps only the uint8 bin index more (its CE reuses Dice's one-hot target)
    logits, labels = budget_case
    small = (logits[:, :, :32, :32, :32].contiguous(), labels[:, :, :32, :32, :32].contiguous())
    combined = saved_bytes_per_element(HardL1ACEandDiceCELoss(to_onehot_y=True, softmax=True), *small)
    dice_ce = saved_bytes_per_element(DiceCELoss(to_onehot_y=True, softmax=True), *small)
    assert combined <= dice_ce + 3.5, (combined, dice_ce)


def test_the_instrument_counts_a_softmax_output_once():
    logits = torch.randn(2, 3, 8, 8, 8)
    # softmax saves its float32 output (4 B/element); the sum saves nothing
    assert saved_bytes_per_element(lambda x, _: torch.softmax(x, 1).sum(), logits, None) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="does not require grad"):
        saved_bytes_per_element(lambda x, _: x.detach().sum(), logits, None)
