"""Differentiable hard and soft calibration binning: autograd functions over :mod:`acecal.binning`'s sums.

Both work per image and per class channel ("marginal" calibration): for a probability map ``probs`` of shape
``(B, C, spatial...)`` they give three ``(B, C, num_bins)`` float64 tensors. :func:`hard_binned_calibration` and
:func:`soft_binned_calibration` are the checked public entry points (bin means, NaN in empty bins);
:func:`differentiable_hard_sums` and :func:`differentiable_soft_sums` are the unchecked sums the ACE losses use.

The binning rule and the forward sums live in :mod:`acecal.binning` (shared with :mod:`acecal.metrics`); what this
module adds is the closed-form backward passes, so autograd keeps almost nothing per element:

- hard: one ``uint8`` bin index per element (bin membership is piecewise constant, so only ``sum_p`` has a gradient,
  ``d sum_p[b, c, m] / d p[b, c, i] = [bin(i) == m]``: the backward is a gather);
- soft: nothing beyond the probabilities (usually the softmax output, which autograd keeps anyway) and, for a label
  map, a ``uint8`` copy of the labels; cells and weights are recomputed in the backward pass.

The gradients with the L1-ACE on top are checked against closed forms in ``Testing/losses/test_ace.py``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from acecal.binning import (
    DEFAULT_NUM_BINS,
    bin_means,
    hard_bin_sums,
    index_dtype,
    prepare_labels,
    soft_bin_sums,
    soft_cells,
    spatial_chunks,
)
from acecal.errors import InvalidInputError
from acecal.tensor_checks import (
    check_empty_weight,
    check_num_bins,
    check_prediction,
    fused_values,
    plain_tensor,
    raise_if_bad,
    range_checks,
)

__all__ = [
    "MAX_NUM_BINS",
    "differentiable_hard_sums",
    "differentiable_soft_sums",
    "hard_binned_calibration",
    "soft_binned_calibration",
]

#: The losses save bin indices as int16 at most.
MAX_NUM_BINS = 32767

#: the four outputs of the binning functions
Tensors4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Element-wise working precision of the backward passes: float64 stays float64, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _HardBinningFunction(torch.autograd.Function):
    """Per-(image, class, bin) sums of a hard binning; differentiable in the probabilities.

    forward(probs (B, C, N), target, num_bins, right, label_offset) -> (sum_p, counts, sum_y, y_total), the first
    three of shape (B, C, num_bins) and the last (B, C), all float64; targets as :func:`acecal.binning.hard_bin_sums`.
    Backward: a gather of the incoming gradient by the saved compact bin index.
    """

    @staticmethod
    def forward(
        ctx: Any, probs: torch.Tensor, target: torch.Tensor, num_bins: int, right: bool, label_offset: int
    ) -> Tensors4:
        compact = torch.empty(probs.shape, dtype=index_dtype(num_bins), device=probs.device)
        sum_p, counts, sum_y = hard_bin_sums(
            probs, target, num_bins, right=right, label_offset=label_offset, index_out=compact
        )
        y_total = sum_y.sum(-1)
        ctx.save_for_backward(compact)
        ctx.in_dtype = probs.dtype
        ctx.mark_non_differentiable(counts, sum_y, y_total)
        return sum_p, counts, sum_y, y_total

    @staticmethod
    def backward(ctx: Any, grad_sum_p: Optional[torch.Tensor], *unused: Any) -> tuple[Optional[torch.Tensor], ...]:
        (compact,) = ctx.saved_tensors
        if grad_sum_p is None:
            return None, None, None, None, None
        cd = _compute_dtype(ctx.in_dtype)
        table = grad_sum_p.to(cd)
        grad = torch.empty(compact.shape, dtype=ctx.in_dtype, device=compact.device)
        for sl in spatial_chunks(compact.shape, compact.device):
            if cd == ctx.in_dtype:
                torch.gather(table, 2, compact[:, :, sl].long(), out=grad[:, :, sl])
            else:
                grad[:, :, sl] = table.gather(2, compact[:, :, sl].long())
        return grad, None, None, None, None


class _SoftBinningFunction(torch.autograd.Function):
    """Per-(image, class, bin) weighted sums of the triangular soft binning; differentiable in the probabilities.

    forward(probs (B, C, N), target, num_bins, label_offset) -> (W, sum_wp, sum_wy, y_total), see
    :func:`acecal.binning.soft_bin_sums`; ``y_total`` (B, C) is the target's total per (image, class).

    Backward: with incoming gradients gW, gP, gY per bin, an element in inner cell j at position f
    (:func:`acecal.binning.soft_cells`) gets
    ``gP_{j-1} + M (gW_j - gW_{j-1}) + (gP_j - gP_{j-1}) (j - 1/2) + 2 (gP_j - gP_{j-1}) f + M (gY_j - gY_{j-1}) y``
    (the chain rule through ``w_ik`` and ``w'_ik = -+M``), and an element in an end cell gets ``gP`` of its end bin.
    """

    @staticmethod
    def forward(ctx: Any, probs: torch.Tensor, target: torch.Tensor, num_bins: int, label_offset: int) -> Tensors4:
        weights, sum_p, sum_y = soft_bin_sums(probs, target, num_bins, label_offset)
        y_total = sum_y.sum(-1)  # = the target's total: the weights of one element add up to 1
        if label_offset >= 0:
            saved_target = target.detach().to(index_dtype(probs.shape[1] + label_offset))
        else:
            saved_target = target.detach()
        ctx.save_for_backward(probs, saved_target)
        ctx.num_bins = num_bins
        ctx.label_offset = label_offset
        ctx.mark_non_differentiable(y_total)
        return weights, sum_p, sum_y, y_total

    @staticmethod
    def backward(
        ctx: Any,
        g_w: Optional[torch.Tensor],
        g_p: Optional[torch.Tensor],
        g_y: Optional[torch.Tensor],
        _unused: Any,
    ) -> tuple[Optional[torch.Tensor], ...]:
        probs, target = ctx.saved_tensors
        m = ctx.num_bins
        bsz, nch, n = probs.shape
        dev = probs.device
        cd = _compute_dtype(probs.dtype)
        zeros = None
        grads = []
        for g in (g_w, g_p, g_y):
            if g is None:
                if zeros is None:
                    zeros = torch.zeros((bsz, nch, m), dtype=torch.float64, device=dev)
                g = zeros
            grads.append(g.to(torch.float64))
        g_w, g_p, g_y = grads
        # per-cell tables (B, C, M + 1): grad_i = u[J_i] + v[J_i] * f_i + wy[J_i] * y_i
        u = g_p.new_zeros((bsz, nch, m + 1))
        v = torch.zeros_like(u)
        wy = torch.zeros_like(u)
        u[..., 0] = g_p[..., 0]
        u[..., m] = g_p[..., m - 1]
        if m > 1:
            beta = g_p[..., 1:] - g_p[..., :-1]
            j = torch.arange(1, m, dtype=torch.float64, device=dev) - 0.5
            u[..., 1:m] = g_p[..., :-1] + m * (g_w[..., 1:] - g_w[..., :-1]) + beta * j
            v[..., 1:m] = 2.0 * beta
            wy[..., 1:m] = m * (g_y[..., 1:] - g_y[..., :-1])
        u, v, wy = u.to(cd), v.to(cd), wy.to(cd)
        labels = prepare_labels(target, ctx.label_offset) if ctx.label_offset >= 0 else None
        grad = torch.empty((bsz, nch, n), dtype=probs.dtype, device=dev)
        for sl in spatial_chunks(probs.shape, dev):
            pc = probs.detach()[:, :, sl]
            cell, f = soft_cells(pc.to(cd), m, inplace=pc.dtype != cd)
            gs = grad[:, :, sl] if cd == probs.dtype else torch.empty(f.shape, dtype=cd, device=dev)
            torch.gather(v, 2, cell, out=gs)
            gs.mul_(f)
            gs.add_(torch.gather(u, 2, cell, out=f))  # f is not needed any more
            del f
            if labels is not None:
                lab = labels[0][:, :, sl]
                own_cell = cell.gather(1, lab)
                flat = (lab * (m + 1)).add_(own_cell).view(bsz, -1)
                add = wy.view(bsz, -1).gather(1, flat).view_as(lab)
                if labels[1] is not None:
                    add.mul_(labels[1][:, :, sl].to(cd))
                gs.scatter_add_(1, lab, add)
            else:
                gs.addcmul_(wy.gather(2, cell), target[:, :, sl].to(cd))
            if gs.data_ptr() != grad[:, :, sl].data_ptr():
                grad[:, :, sl] = gs
        return grad, None, None, None


def differentiable_hard_sums(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int, right: bool = False, label_offset: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard-binning sums, differentiable in ``probs``; nothing is checked (the losses check first).

    Args:
        probs: ``(B, C, spatial...)`` probabilities in [0, 1].
        target: one-hot / probabilities ``(B, C, spatial...)`` (``label_offset=-1``) or a label map
            ``(B, 1, spatial...)`` whose value ``l`` is channel ``l - label_offset``.
        num_bins, right: as :func:`hard_binned_calibration`.

    Returns:
        ``(sum_p, counts, sum_y, y_total)``: three ``(B, C, num_bins)`` and one ``(B, C)`` float64 tensor; only
        ``sum_p`` carries a gradient.
    """
    bsz, nch = probs.shape[:2]
    p = probs.reshape(bsz, nch, -1)
    t = target.reshape(target.shape[0], target.shape[1], -1)
    return _HardBinningFunction.apply(p, t, num_bins, right, label_offset)


def differentiable_soft_sums(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int, label_offset: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-binning sums ``(W, sum_wp, sum_wy, y_total)``, differentiable in ``probs``; arguments as
    :func:`differentiable_hard_sums`, nothing is checked. The first three carry gradients."""
    bsz, nch = probs.shape[:2]
    p = probs.reshape(bsz, nch, -1)
    t = target.reshape(target.shape[0], target.shape[1], -1)
    return _SoftBinningFunction.apply(p, t, num_bins, label_offset)


def _check_probs_and_target(who: str, probs: torch.Tensor, target: torch.Tensor) -> None:
    """Shapes, dtypes and values of the public functions' arguments (one fused host synchronisation)."""
    if not isinstance(probs, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise InvalidInputError(f"{who}: probs and target must be torch.Tensor, got {type(probs)} and {type(target)}.")
    check_prediction(probs, who, "probs")
    if probs.shape != target.shape:
        raise InvalidInputError(
            f"{who}: probs and target must have the same shape (B, C, spatial...), got {tuple(probs.shape)} and "
            f"{tuple(target.shape)}. One-hot encode a label map first (e.g. monai.networks.utils.one_hot)."
        )
    values = fused_values(range_checks("probs", probs) + range_checks("target", target))
    raise_if_bad(who, values, probs_name="probs")


def hard_binned_calibration(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int = DEFAULT_NUM_BINS, right: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard-binned reliability statistics per image, class and confidence bin.

    Bin-for-bin identical to ``monai.metrics.calibration_binning``: edges ``linspace(0, 1 + eps32, num_bins + 1)``
    in float32 and MONAI's tie rule, so bins are ``(k/M, (k+1)/M]`` and a value exactly on ``k/M`` goes to the
    lower bin (0 goes to bin 0, 1 to bin M - 1); ``right=True`` reproduces ``bucketize(..., right=True)``.
    Unlike MONAI there is no loop over batch and class and the sums are accumulated in float64.

    Args:
        probs: probabilities of shape ``(B, C, spatial...)``, values in [0, 1] (any float dtype; binned as float32,
            like MONAI).
        target: one-hot (or probability) target of the same shape, values in [0, 1].
        num_bins: number of equal-width bins M on [0, 1]. Defaults to 20.
        right: MONAI's ``right`` option (which side of an edge a value exactly on it goes to). Defaults to False.

    Returns:
        ``(mean_p, mean_y, counts)``, each of shape ``(B, C, num_bins)`` and dtype float64: mean probability,
        mean target (observed frequency) and number of elements per bin. ``mean_p`` and ``mean_y`` are NaN for empty
        bins. ``mean_p`` is differentiable with respect to ``probs``; ``mean_y`` and ``counts`` are not.

    Raises:
        ValueError: if shapes differ, ``probs`` has fewer than 3 dimensions or is empty, values are NaN/inf or
            outside [0, 1], or ``num_bins`` is not a positive integer.

    References:
        Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
        IEEE TMI, arXiv:2506.03942. Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
        Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
    """
    who = "hard_binned_calibration"
    probs, target = plain_tensor(probs), plain_tensor(target)
    check_num_bins(num_bins, who, max_bins=MAX_NUM_BINS)
    _check_probs_and_target(who, probs, target)
    sum_p, counts, sum_y, _ = differentiable_hard_sums(probs, target, num_bins, bool(right))
    mean_p, mean_y = bin_means(counts, sum_p, sum_y)
    return mean_p, mean_y, counts


def soft_binned_calibration(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int = DEFAULT_NUM_BINS, empty_weight: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-binned (triangular kernel) reliability statistics per image, class and confidence bin.

    Bin k has centre ``c_k = (k + 1/2) / M``; each value is shared linearly between its two neighbouring centres
    (a triangular kernel of half-width ``1/M``), and values below ``c_0`` / from ``c_{M-1}`` up go wholly to the
    first / last bin. So every element spreads a total weight of 1 over at most two bins. Examples (M = 20):
    0.05 -> bins 0 and 1 at 0.5 each; 0.0625 -> 0.25 / 0.75; 0.075 -> bin 1 only; 0.02 -> bin 0 only.

    Args:
        probs: probabilities of shape ``(B, C, spatial...)``, values in [0, 1].
        target: one-hot (or probability) target of the same shape, values in [0, 1].
        num_bins: number of bins M. Defaults to 20.
        empty_weight: a bin whose total weight ``W_k`` is below this (or zero) counts as empty. Defaults to 0.01.

    Returns:
        ``(mean_p, mean_y, counts)``, each ``(B, C, num_bins)`` float64: the weighted means
        ``sum_i w_ik p_i / W_k`` and ``sum_i w_ik y_i / W_k`` (NaN for empty bins) and the bin weights ``W_k``.
        All three are differentiable with respect to ``probs`` (the weights depend on the probabilities).

    Raises:
        ValueError: as :func:`hard_binned_calibration`, and for a negative or non-finite ``empty_weight``.

    References:
        Barfoot et al., IEEE TMI, arXiv:2506.03942 (soft-binned L1-ACE); arXiv:2403.06759 (MICCAI 2024).
    """
    who = "soft_binned_calibration"
    probs, target = plain_tensor(probs), plain_tensor(target)
    check_num_bins(num_bins, who, max_bins=MAX_NUM_BINS)
    empty_weight = check_empty_weight(empty_weight, who)
    _check_probs_and_target(who, probs, target)
    weights, sum_p, sum_y, _ = differentiable_soft_sums(probs, target, num_bins)
    mean_p, mean_y = bin_means(weights, sum_p, sum_y, empty_below=empty_weight)
    return mean_p, mean_y, weights
