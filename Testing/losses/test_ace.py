"""HardL1ACELoss / SoftL1ACELoss against simple float64 loop references, closed-form gradients and gradcheck."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from monai.data import MetaTensor

from acecal.losses import HardL1ACELoss, SoftL1ACELoss
from acecal.losses.binning import differentiable_hard_sums, differentiable_soft_sums

EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------------------------
# obviously-correct float64 references: loops over image, class and bin
# ----------------------------------------------------------------------------------------------------------------


def ref_hard_ace(probs: torch.Tensor, onehot: torch.Tensor, num_bins: int = 20) -> torch.Tensor:
    """(B, C) hL1-ACE: MONAI edges (float32 values, lower bin on an edge), mean over non-empty bins."""
    edges = torch.linspace(0.0, 1.0 + EPS32, num_bins + 1)
    bsz, nch = probs.shape[:2]
    out = torch.zeros(bsz, nch, dtype=torch.float64)
    for b in range(bsz):
        for c in range(nch):
            p = probs[b, c].reshape(-1)
            y = onehot[b, c].reshape(-1).double()
            idx = torch.bucketize(p.float(), edges[1:]).clamp(max=num_bins - 1)
            gaps = []
            for m in range(num_bins):
                sel = idx == m
                if sel.any():
                    gaps.append(abs(p[sel].double().mean().item() - y[sel].mean().item()))
            out[b, c] = sum(gaps) / len(gaps)
    return out


def soft_weights(p: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (N, M) triangular weights and their derivatives d w / d p, float64."""
    centres = (torch.arange(num_bins, dtype=torch.float64) + 0.5) / num_bins
    d = p[:, None] - centres[None, :]
    inside = d.abs() < 1.0 / num_bins
    w = torch.where(inside, 1.0 - d.abs() * num_bins, torch.zeros_like(d))
    dw = torch.where(inside, -num_bins * torch.sign(d), torch.zeros_like(d))
    low = p < centres[0]
    high = p >= centres[-1]
    for mask, col in ((low, 0), (high, num_bins - 1)):
        w[mask] = 0.0
        dw[mask] = 0.0
        w[mask, col] = 1.0
    return w, dw


def ref_soft_ace(probs: torch.Tensor, onehot: torch.Tensor, num_bins: int = 20, empty_weight: float = 0.01):
    bsz, nch = probs.shape[:2]
    out = torch.zeros(bsz, nch, dtype=torch.float64)
    for b in range(bsz):
        for c in range(nch):
            p = probs[b, c].reshape(-1).double()
            y = onehot[b, c].reshape(-1).double()
            w, _ = soft_weights(p, num_bins)
            gaps = []
            for k in range(num_bins):
                wk = w[:, k].sum().item()
                if wk >= empty_weight and wk > 0:
                    gaps.append(abs((w[:, k] * p).sum().item() / wk - (w[:, k] * y).sum().item() / wk))
            out[b, c] = sum(gaps) / len(gaps)
    return out


def ref_reduce(ace: torch.Tensor, onehot: torch.Tensor, reduction: str, weight=None, ignore_empty=True):
    f = ace.clone()
    if weight is not None:
        f = f * torch.as_tensor(weight, dtype=torch.float64)
    valid = torch.ones_like(f, dtype=torch.bool)
    if ignore_empty:
        valid = onehot.flatten(2).sum(-1) > 0
    f = torch.where(valid, f, torch.zeros_like(f))
    if reduction == "none":
        return f
    if reduction == "sum":
        return f.sum()
    return f.sum() / max(int(valid.sum()), 1)


def make_case(seed: int, shape=(2, 4, 6, 5, 4), absent=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    bsz, nch = shape[:2]
    logits = (2.5 * torch.randn(*shape, generator=gen)).to(dtype)
    labels = torch.randint(0, nch, (bsz, 1, *shape[2:]), generator=gen)
    if absent:  # class 2 absent from image 0, class 1 from image 1
        labels[0][labels[0] == 2] = 0
        labels[1][labels[1] == 1] = nch - 1
    onehot = torch.nn.functional.one_hot(labels[:, 0], nch).movedim(-1, 1).to(dtype)
    return logits, labels, onehot


LOSSES = [(HardL1ACELoss, ref_hard_ace), (SoftL1ACELoss, ref_soft_ace)]


# ----------------------------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, ref", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignore_empty", [True, False])
def test_values_match_float64_loop_reference(cls, ref, reduction, ignore_empty):
    logits, labels, onehot = make_case(0)
    probs = torch.softmax(logits, 1)
    expected = ref_reduce(ref(probs, onehot), onehot, reduction, ignore_empty=ignore_empty)
    for target, to_onehot in ((labels, True), (onehot, False)):
        loss = cls(to_onehot_y=to_onehot, softmax=True, reduction=reduction, ignore_empty_classes=ignore_empty)
        out = loss(logits, target)
        assert out.dtype == torch.float64
        assert out.shape == ((2, 4) if reduction == "none" else ())
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls, ref", LOSSES)
def test_include_background_false_and_class_weights(cls, ref):
    logits, labels, onehot = make_case(1)
    probs = torch.softmax(logits, 1)
    ace = ref(probs, onehot)[:, 1:]
    weight = [0.5, 2.0, 1.5]
    expected = ref_reduce(ace, onehot[:, 1:], "mean", weight=weight)
    for target, to_onehot in ((labels, True), (onehot, False)):
        loss = cls(include_background=False, to_onehot_y=to_onehot, softmax=True, weight=weight)
        torch.testing.assert_close(loss(logits, target), expected, rtol=1e-10, atol=1e-12)
        none = cls(include_background=False, to_onehot_y=to_onehot, softmax=True, weight=weight, reduction="none")
        assert none(logits, target).shape == (2, 3)
    scalar = cls(to_onehot_y=True, softmax=True, weight=3.0, reduction="sum")
    torch.testing.assert_close(scalar(logits, labels), 3.0 * ref_reduce(ref(probs, onehot), onehot, "sum"))
    with pytest.raises(ValueError, match="weight has 3 values but the loss sees 4 classes"):
        cls(to_onehot_y=True, softmax=True, weight=weight)(logits, labels)


@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
def test_empty_classes_are_left_out_of_the_mean(cls):
    logits, labels, onehot = make_case(2)
    per = cls(to_onehot_y=True, softmax=True, reduction="none", ignore_empty_classes=False)(logits, labels)
    present = onehot.flatten(2).sum(-1) > 0
    assert present.sum() == 6  # 8 entries, 2 absent
    mean = cls(to_onehot_y=True, softmax=True)(logits, labels)
    torch.testing.assert_close(mean, per[present].mean())  # not per[present].sum() / 8 (the authors' code)
    none = cls(to_onehot_y=True, softmax=True, reduction="none")(logits, labels)
    assert torch.equal(none[~present], torch.zeros(2, dtype=none.dtype))
    torch.testing.assert_close(none[present], per[present])
    # without the flag an absent class counts with its (non-zero) ACE
    assert (per[~present] > 0).all()
    torch.testing.assert_close(
        cls(to_onehot_y=True, softmax=True, ignore_empty_classes=False)(logits, labels), per.mean()
    )


@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
def test_all_classes_excluded_gives_connected_zero(cls):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.zeros(2, 3, 4, 4)  # no class present anywhere
    loss = cls(softmax=True)(logits, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    include_bg_off = cls(to_onehot_y=True, softmax=True, include_background=False)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    out = include_bg_off(x, torch.zeros(1, 1, 5, 5))  # background only: every foreground class absent
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
def test_label_map_dtypes_agree_with_one_hot(cls):
    logits, labels, onehot = make_case(3, dtype=torch.float32)
    expected = cls(softmax=True, reduction="none")(logits, onehot)
    for lab in (labels, labels.float(), labels.to(torch.uint8), labels.to(torch.int32)):
        x = logits.clone().requires_grad_()
        out = cls(to_onehot_y=True, softmax=True, reduction="none")(x, lab)
        torch.testing.assert_close(out, expected)
        out.sum().backward()
        y = logits.clone().requires_grad_()
        cls(softmax=True, reduction="none")(y, onehot).sum().backward()
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
def test_sigmoid_other_act_and_probability_input(cls):
    logits, _, onehot = make_case(4, absent=False)
    probs = torch.sigmoid(logits)
    ref = cls(reduction="none")(probs, onehot)
    torch.testing.assert_close(cls(sigmoid=True, reduction="none")(logits, onehot), ref)
    torch.testing.assert_close(cls(other_act=torch.sigmoid, reduction="none")(logits, onehot), ref)
    # soft (probability) targets are allowed
    soft_target = torch.rand_like(probs)
    out = cls(reduction="none")(probs, soft_target)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_inputs(cls, dtype):
    logits, labels, _ = make_case(5, shape=(2, 3, 8, 8, 8), dtype=torch.float32)
    x16 = logits.to(dtype).requires_grad_()
    out = cls(to_onehot_y=True, softmax=True)(x16, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert x16.grad.dtype == dtype and torch.isfinite(x16.grad.float()).all()
    # same quantised logits in float32: close
    x32 = x16.detach().float().requires_grad_()
    ref = cls(to_onehot_y=True, softmax=True)(x32, labels)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_single_channel_warnings_follow_monai():
    x = torch.rand(2, 1, 5, 5)
    y = (torch.rand(2, 1, 5, 5) > 0.5).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = HardL1ACELoss(to_onehot_y=True, softmax=True, include_background=False)(x, y)
    messages = " ".join(str(w.message) for w in caught)
    assert "to_onehot_y=True" in messages and "softmax=True" in messages and "include_background=False" in messages
    torch.testing.assert_close(out, HardL1ACELoss()(x, y))


# ----------------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------------


def test_hard_gradient_equals_closed_form():
    logits, labels, onehot = make_case(6, absent=True)
    probs = torch.softmax(logits, 1).requires_grad_()
    weight = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    loss = HardL1ACELoss(to_onehot_y=True, weight=weight)(probs, labels)
    loss.backward()
    # closed form: sign(mean_p_m - mean_y_m) / (K n_m), times weight / #valid
    edges = torch.linspace(0.0, 1.0 + EPS32, 21)
    present = onehot.flatten(2).sum(-1) > 0
    n_valid = int(present.sum())
    expected = torch.zeros_like(probs)
    for b in range(2):
        for c in range(4):
            if not present[b, c]:
                continue
            p = probs[b, c].detach().reshape(-1)
            y = onehot[b, c].reshape(-1)
            idx = torch.bucketize(p.float(), edges[1:]).clamp(max=19)
            nonempty = [m for m in range(20) if (idx == m).any()]
            g = torch.zeros_like(p)
            for m in nonempty:
                sel = idx == m
                s = torch.sign(p[sel].mean() - y[sel].mean())
                g[sel] = s / (len(nonempty) * sel.sum())
            expected[b, c] = (g * weight[c] / n_valid).view_as(expected[b, c])
    torch.testing.assert_close(probs.grad, expected, rtol=1e-12, atol=1e-15)


def _soft_closed_form(probs, onehot, num_bins=20, empty_weight=0.01):
    """d mean_bc(ACE) / d p in closed form, per (b, c): the chain rule through the triangular weights w and their
    derivatives dw, written out with dense (N, M) weight matrices."""
    bsz, nch = probs.shape[:2]
    out = torch.zeros_like(probs)
    for b in range(bsz):
        for c in range(nch):
            p = probs[b, c].reshape(-1)
            y = onehot[b, c].reshape(-1)
            w, dw = soft_weights(p, num_bins)
            wk = w.sum(0)
            ok = (wk >= empty_weight) & (wk > 0)
            safe = torch.where(ok, wk, torch.ones_like(wk))
            mp = (w * p[:, None]).sum(0) / safe
            my = (w * y[:, None]).sum(0) / safe
            s = torch.where(ok, torch.sign(mp - my), torch.zeros_like(mp))
            k = ok.sum()
            term = (s / safe)[None, :] * (w + dw * ((p[:, None] - mp[None, :]) - (y[:, None] - my[None, :])))
            out[b, c] = (term.sum(1) / k).view_as(out[b, c])
    return out


def _away_from_kinks(gen, shape, num_bins=20):
    """Probabilities in [0, 1] at least 0.1 bin widths from every bin centre (the kernel's kinks)."""
    k = torch.randint(0, num_bins, shape, generator=gen).double()
    offset = 0.1 + 0.35 * torch.rand(shape, generator=gen, dtype=torch.float64)
    return (k + 0.5 + offset * torch.where(k == num_bins - 1, -1.0, 1.0)) / num_bins


def test_soft_gradient_equals_closed_form():
    gen = torch.Generator().manual_seed(7)
    probs = _away_from_kinks(gen, (2, 3, 40)).requires_grad_()
    onehot = (torch.rand(2, 3, 40, generator=gen) > 0.6).double()
    loss = SoftL1ACELoss(reduction="sum", ignore_empty_classes=False)(probs, onehot)
    loss.backward()
    torch.testing.assert_close(probs.grad, _soft_closed_form(probs.detach(), onehot), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("num_bins", [1, 3, 20])
def test_soft_gradcheck_float64(num_bins):
    gen = torch.Generator().manual_seed(num_bins)
    probs = _away_from_kinks(gen, (2, 2, 6), num_bins).requires_grad_()
    target = torch.rand(2, 2, 6, dtype=torch.float64, generator=gen)
    loss = SoftL1ACELoss(num_bins=num_bins, reduction="none", ignore_empty_classes=False)
    assert torch.autograd.gradcheck(lambda p: loss(p, target), (probs,), eps=1e-7, atol=1e-7)


def test_soft_gradcheck_label_map_and_softmax():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 5), generator=gen)
    for include_background in (True, False):
        loss = SoftL1ACELoss(to_onehot_y=True, softmax=True, include_background=include_background)
        assert torch.autograd.gradcheck(lambda z, loss=loss: loss(z, labels), (logits,), eps=1e-7, atol=1e-7)


def test_hard_gradcheck_through_softmax():
    # hard binning is piecewise linear in the probabilities: finite differences agree away from bin edges
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(1, 3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 3, (1, 1, 3, 4), generator=gen)
    loss = HardL1ACELoss(to_onehot_y=True, softmax=True)
    assert torch.autograd.gradcheck(lambda z, loss=loss: loss(z, labels), (logits,), eps=1e-8, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
def test_input_errors(cls):
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 1, 4, 4))
    loss = cls(to_onehot_y=True, softmax=True)
    for bad_value in (math.nan, math.inf, -math.inf):
        bad = logits.clone()
        bad[1, 2, 3, 3] = bad_value
        with pytest.raises(ValueError, match="NaN or infinite"):
            loss(bad, labels)
    with pytest.raises(ValueError, match=r"label map of shape \(2, 1, 4, 4\).*unsqueeze"):
        loss(logits, labels[:, 0])
    with pytest.raises(ValueError, match="class indices in \\[0, 2\\]"):
        loss(logits, labels + 1)
    with pytest.raises(ValueError, match="class indices"):
        loss(logits, labels - 1)
    with pytest.raises(ValueError, match="non-integer"):
        loss(logits, labels.float() + 0.5)
    with pytest.raises(ValueError, match="spatial"):
        loss(logits[:, :, 0, 0], labels[:, :, 0, 0])
    with pytest.raises(ValueError, match="floating point"):
        loss(labels.expand(2, 3, 4, 4), labels)
    # probabilities expected: out-of-range values, NaN and a label map without to_onehot_y
    plain = cls()
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*softmax=True"):
        plain(logits, onehot)
    nan_probs = torch.full_like(logits, 0.5)
    nan_probs[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        plain(nan_probs, onehot)
    with pytest.raises(ValueError, match="set to_onehot_y=True"):
        plain(torch.softmax(logits, 1), labels)
    with pytest.raises(ValueError, match="one-hot / probability target must lie in"):
        plain(torch.softmax(logits, 1), onehot * 2)
    with pytest.raises(ValueError, match="other_act must return"):
        cls(other_act=lambda t: t[:, :1])(logits, onehot)


@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
def test_argument_errors(cls):
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="max")
    with pytest.raises(ValueError, match="num_bins"):
        cls(num_bins=0)
    with pytest.raises(ValueError, match="at most one of"):
        cls(softmax=True, sigmoid=True)
    with pytest.raises(ValueError, match="callable"):
        cls(other_act="relu")
    with pytest.raises(ValueError, match=">= 0"):
        cls(weight=[1.0, -1.0])
    with pytest.raises(ValueError, match="1-D"):
        cls(weight=[[1.0]])
    if cls is SoftL1ACELoss:
        with pytest.raises(ValueError, match="empty_weight"):
            cls(empty_weight=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
def test_cuda_matches_cpu_without_host_syncs_in_the_binning(cls):
    logits, labels, _ = make_case(10, shape=(2, 4, 16, 16, 16), dtype=torch.float32)
    x_cpu = logits.clone().requires_grad_()
    ref = cls(to_onehot_y=True, softmax=True)(x_cpu, labels)
    ref.backward()
    x = logits.cuda().requires_grad_()
    out = cls(to_onehot_y=True, softmax=True)(x, labels.cuda())
    out.backward()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-7)
    # the binning and its backward never synchronise with the host (the edge tables are cached by now)
    probs = torch.softmax(x.detach(), 1).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums = (
            differentiable_hard_sums(probs, labels.cuda(), 20, False, 0)
            if cls is HardL1ACELoss
            else differentiable_soft_sums(probs, labels.cuda(), 20, 0)
        )
        sums[0].sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
def test_monai_metatensor_inputs(cls):
    logits, labels, _ = make_case(11, dtype=torch.float32)
    x = MetaTensor(logits.clone()).requires_grad_()
    out = cls(to_onehot_y=True, softmax=True)(x, MetaTensor(labels.float()))
    out.backward()
    x_ref = logits.clone().requires_grad_()
    ref = cls(to_onehot_y=True, softmax=True)(x_ref, labels)
    ref.backward()
    torch.testing.assert_close(out.as_tensor() if hasattr(out, "as_tensor") else out, ref)
    torch.testing.assert_close(torch.as_tensor(x.grad), x_ref.grad)
