"""SegResNetTwoHead: shapes, the split helper, the trunk it shares with MONAI's SegResNet, where gradients go."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import SegResNet
from monai.utils import set_determinism

from acecal.bundles import BundleConfig, NetworkConfig, build_network
from acecal.networks import SegResNetTwoHead, is_two_head, num_outputs, split_heads

ARGS = dict(init_filters=8, blocks_down=(1, 1), blocks_up=(1,))


def _net(**kw) -> SegResNetTwoHead:
    set_determinism(seed=0)
    return SegResNetTwoHead(spatial_dims=3, in_channels=1, out_channels=3, **{**ARGS, **kw})


def test_output_is_segmentation_then_calibration_logits():
    net = _net().eval()
    x = torch.randn(2, 1, 16, 16, 8)
    out = net(x)
    assert out.shape == (2, 6, 16, 16, 8)
    seg, cal = split_heads(out, 3)
    assert seg.shape == cal.shape == (2, 3, 16, 16, 8)
    # the halves are the two heads on the one decoder output
    feats = net.features(x)
    torch.testing.assert_close(seg, net.conv_final(feats))
    torch.testing.assert_close(cal, net.calibration_head(feats))
    assert not torch.allclose(seg, cal)


def test_trunk_and_segmentation_head_are_monai_segresnet():
    """Same seed -> the same trunk and segmentation head as the one-head SegResNet, and its weights load in."""
    set_determinism(seed=0)
    one = SegResNet(spatial_dims=3, in_channels=1, out_channels=3, **ARGS).eval()
    two = _net().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(split_heads(two(x), 3)[0], one(x), rtol=0, atol=0)
    extra = set(two.state_dict()) - set(one.state_dict())
    assert extra and all(k.startswith("calibration_head.") for k in extra)
    fresh = SegResNetTwoHead(out_channels=3, **ARGS)
    missing, unexpected = fresh.load_state_dict(one.state_dict(), strict=False)
    assert set(missing) == extra and not unexpected


@pytest.mark.parametrize("trunk_grad", [0.0, 0.5, 1.0])
def test_calibration_gradient_reaches_the_trunk_only_when_asked(trunk_grad):
    net = _net(trunk_grad=trunk_grad)
    x = torch.randn(1, 1, 16, 16, 16)
    seg, cal = split_heads(net(x), 3)
    cal.square().mean().backward()  # a loss on the calibration head alone
    trunk = [p for n, p in net.named_parameters() if not n.startswith(("calibration_head.", "conv_final."))]
    head = [p for n, p in net.named_parameters() if n.startswith("calibration_head.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    trunk_norm = sum(float(p.grad.abs().sum()) for p in trunk if p.grad is not None)
    # the segmentation head gets nothing from a calibration loss (zero through the concatenation)
    assert all(p.grad is None or not p.grad.any() for n, p in net.named_parameters() if n.startswith("conv_final."))
    if trunk_grad == 0.0:
        assert trunk_norm == 0.0
    else:
        assert trunk_norm > 0.0
    if trunk_grad == 0.5:  # the factor scales the trunk's gradient exactly, the head's not at all
        full = _net(trunk_grad=1.0)
        split_heads(full(x), 3)[1].square().mean().backward()
        p_half = dict(net.named_parameters())["convInit.conv.weight"].grad
        p_full = dict(full.named_parameters())["convInit.conv.weight"].grad
        torch.testing.assert_close(p_half, 0.5 * p_full)
        torch.testing.assert_close(
            dict(net.named_parameters())["calibration_head.0.conv1.conv.weight"].grad,
            dict(full.named_parameters())["calibration_head.0.conv1.conv.weight"].grad,
        )


def test_calibration_head_can_see_the_segmentation_without_training_it():
    net = _net(calibration_sees_segmentation=True, calibration_blocks=2)
    x = torch.randn(1, 1, 16, 16, 16)
    out = net(x)
    assert out.shape == (1, 6, 16, 16, 16)
    split_heads(out, 3)[1].sum().backward()
    grad = dict(net.named_parameters())["conv_final.2.conv.weight"].grad  # the segmentation logits are detached
    assert grad is None or not grad.any()


def test_split_heads_on_numpy_and_one_head():
    arr = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)  # (2C, ...) with C = 2, channel axis 0
    seg, cal = split_heads(arr, 2, dim=0)
    np.testing.assert_array_equal(seg, arr[:2])
    np.testing.assert_array_equal(cal, arr[2:])
    seg[0, 0, 0] = -1  # views, not copies
    assert arr[0, 0, 0] == -1
    one = torch.randn(1, 3, 4, 4, 4)
    s1, c1 = split_heads(one, 3, two_head=False)
    assert s1 is one and c1 is one
    with pytest.raises(ValueError, match="2 x 3 = 6 channels"):
        split_heads(one, 3)


def test_bundle_network_name_and_bad_arguments():
    cfg = BundleConfig(
        id="t",
        labels={"0": "bg", "1": "a", "2": "b"},
        network=NetworkConfig(name="SegResNetTwoHead", args={**ARGS, "trunk_grad": 0.0}),
    )
    net = build_network(cfg)
    assert isinstance(net, SegResNetTwoHead) and net.trunk_grad == 0.0
    assert is_two_head(cfg) and is_two_head(cfg.network) and is_two_head("SegResNetTwoHead") and is_two_head(net)
    assert num_outputs(cfg, 3) == 6
    one = BundleConfig(id="t", labels={"0": "bg", "1": "a"})
    assert not is_two_head(one) and num_outputs(one, 2) == 2
    with pytest.raises(ValueError, match="trunk_grad"):
        SegResNetTwoHead(out_channels=2, trunk_grad=2.0)
    with pytest.raises(ValueError, match="calibration_blocks"):
        SegResNetTwoHead(out_channels=2, calibration_blocks=-1)


def test_temperature_output_keeps_the_segmentation_ranking():
    net = _net(calibration_output="temperature", trunk_grad=0.0, calibration_sees_segmentation=True)
    x = torch.randn(1, 1, 16, 16, 16)
    seg, cal = split_heads(net(x), 3)
    torch.testing.assert_close(cal, seg)  # T = 1 at initialisation
    with torch.no_grad():  # any head weights: a positive temperature per voxel, the same argmax
        for p in net.calibration_head.parameters():
            p.normal_(0, 0.5)
    seg, cal = split_heads(net(x), 3)
    ratio = (seg / cal).detach()  # = the voxel's temperature, the same for every class
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    assert float(ratio.min()) >= 0.05 - 1e-6 and float(ratio.std()) > 1e-3
    assert torch.equal(seg.argmax(1), cal.argmax(1))
    cal.square().mean().backward()  # trunk_grad = 0: the calibration loss trains the head only
    assert all(
        p.grad is None or not p.grad.any() for n, p in net.named_parameters() if not n.startswith("calibration_head.")
    )
    assert any(p.grad is not None and p.grad.any() for p in net.calibration_head.parameters())
    with pytest.raises(ValueError, match="calibration_output"):
        _net(calibration_output="probabilities")


def test_residual_output_starts_as_the_segmentation_and_learns_a_correction():
    net = _net(calibration_output="residual", trunk_grad=0.0, calibration_sees_segmentation=True)
    x = torch.randn(1, 1, 16, 16, 16)
    seg, cal = split_heads(net(x), 3)
    torch.testing.assert_close(cal, seg)  # no correction at initialisation
    with torch.no_grad():
        for p in net.calibration_head.parameters():
            p.normal_(0, 0.5)
    seg, cal = split_heads(net(x), 3)
    correction = (cal - seg).detach()  # per voxel and class: it changes the probabilities, not only the logits
    assert float((correction - correction.mean(1, keepdim=True)).abs().max()) > 1e-3
    assert float((cal.softmax(1) - seg.softmax(1)).detach().abs().max()) > 1e-3
    cal.square().mean().backward()  # trunk_grad = 0: the calibration loss trains the head only
    assert all(
        p.grad is None or not p.grad.any() for n, p in net.named_parameters() if not n.startswith("calibration_head.")
    )
    assert any(p.grad is not None and p.grad.any() for p in net.calibration_head.parameters())
