"""Marginal L1 average calibration error losses: hard-binned (hL1-ACE) and soft-binned (sL1-ACE).

For every image b and class channel c the loss is the unweighted mean, over the K non-empty confidence bins, of the
gap between the bin's mean probability and the bin's observed frequency:

    ACE[b, c] = (1 / K) * sum_{m non-empty} | mean_p[b, c, m] - mean_y[b, c, m] |

Each loss is used in two steps, which a combined loss can take separately to share one activation with its other
terms (as :class:`~acecal.losses.L1ACEandDiceCELoss` does)::

    probs, target = ace.prepare(logits, labels)   # checks, activation, one fused validation
    loss = ace.from_probs(probs, target)          # what ace(logits, labels) returns

References:
    Barfoot, T., Garcia-Peraza-Herrera, L. C., Glocker, B., Vercauteren, T. "Average Calibration Losses for Reliable
    Uncertainty in Medical Image Segmentation." IEEE Transactions on Medical Imaging, arXiv:2506.03942.

    Barfoot, T., et al. "Average Calibration Error: A Differentiable Loss for Improved Reliability in Image
    Segmentation." MICCAI 2024 (LNCS 15009), arXiv:2403.06759.

    The authors' code: github.com/cai4cai/Average-Calibration-Losses ("the published code" below).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from acecal.binning import DEFAULT_NUM_BINS
from acecal.errors import InvalidInputError
from acecal.tensor_checks import (
    FLOAT_DTYPES,
    LOSS_ADVICE,
    check_empty_weight,
    check_num_bins,
    check_prediction,
    fused_values,
    label_checks,
    plain_tensor,
    raise_if_bad,
    range_checks,
)

from .binning import MAX_NUM_BINS, differentiable_hard_sums, differentiable_soft_sums

__all__ = ["HardL1ACELoss", "L1ACELoss", "SoftL1ACELoss"]


class L1ACELoss(_Loss):
    """What the hard and soft L1-ACE losses share: arguments, activation, validation, reduction.

    Subclasses compute the per-(image, class) ACE from probabilities (:meth:`_ace`); use
    :class:`HardL1ACELoss` or :class:`SoftL1ACELoss`.
    """

    def __init__(
        self,
        num_bins: int = DEFAULT_NUM_BINS,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[torch.Tensor], torch.Tensor] | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        ignore_empty_classes: bool = True,
    ) -> None:
        who = type(self).__name__
        try:
            reduction = LossReduction(reduction).value
        except ValueError:
            raise InvalidInputError(
                f"{who}: unsupported reduction {reduction!r}, available options are 'mean', 'sum' and 'none'."
            ) from None
        super().__init__(reduction=reduction)
        check_num_bins(num_bins, who, max_bins=MAX_NUM_BINS)
        if other_act is not None and not callable(other_act):
            raise InvalidInputError(f"{who}: other_act must be None or callable, got {type(other_act).__name__}.")
        if int(bool(sigmoid)) + int(bool(softmax)) + int(other_act is not None) > 1:
            raise InvalidInputError(
                f"{who}: incompatible arguments, set at most one of sigmoid=True, softmax=True, other_act."
            )
        self.num_bins = num_bins
        self.include_background = bool(include_background)
        self.to_onehot_y = bool(to_onehot_y)
        self.sigmoid = bool(sigmoid)
        self.softmax = bool(softmax)
        self.other_act = other_act
        self.ignore_empty_classes = bool(ignore_empty_classes)
        self.register_buffer("class_weight", _class_weight(weight, who))
        self.class_weight: torch.Tensor | None

    def _ace(self, probs: torch.Tensor, target: torch.Tensor, label_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(image, class) ACE (B, C') float64 and the target's total (B, C') from probabilities (B, C', N...)
        and a target (a label map when ``label_offset >= 0``)."""
        raise NotImplementedError

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits or probabilities of shape ``(B, C, spatial...)`` (set ``softmax``/``sigmoid``/``other_act``
                for logits). Any float dtype; fp16/bf16 are accumulated in float64.
            target: a one-hot / probability target of shape ``(B, C, spatial...)`` with values in [0, 1], or, with
                ``to_onehot_y=True``, a label map of shape ``(B, 1, spatial...)`` holding class indices in [0, C - 1]
                (any integer or integer-valued float dtype; it is used directly, never one-hot encoded).

        Returns:
            ``reduction="mean"``: 0-d tensor, the mean of ``weight[c] * ACE[b, c]`` over the valid (b, c) entries;
            ``"sum"``: their sum; ``"none"``: a ``(B, C)`` tensor (``C`` without background when
            ``include_background=False``) with excluded entries set to 0. float32 (float64 for float64 input).

        Raises:
            ValueError: NaN/inf in ``input`` or ``target``, probabilities outside [0, 1] after the activation,
                mismatched shapes, label values outside [0, C - 1], or a ``weight`` of the wrong length.
        """
        probs, target = self.prepare(input, target)
        return self.from_probs(probs, target, out_dtype=_out_dtype(input.dtype))

    def prepare(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Check ``input`` and ``target``, apply the activation and validate the values (one host synchronisation).

        Args:
            input, target: as :meth:`forward`.

        Returns:
            ``(probs, target)`` for :meth:`from_probs`: ``probs`` ``(B, C, spatial...)`` in [0, 1], the activation's
            output (still attached to the graph; another loss term may use it too), and ``target`` as given, as a
            plain tensor: the label map ``(B, 1, spatial...)`` with ``to_onehot_y=True`` (and C > 1), else the
            one-hot / probability target ``(B, C, spatial...)``.

        Raises:
            ValueError: as :meth:`forward`.
        """
        input, target = plain_tensor(input), plain_tensor(target)
        use_labels = self._check_shapes(input, target)
        probs, activated = self._activate(input)
        self._validate(input, probs, activated, target, use_labels)
        return probs, target

    def from_probs(
        self, probs: torch.Tensor, target: torch.Tensor, *, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The loss from what :meth:`prepare` returns (not checked again).

        Args:
            probs: ``(B, C, spatial...)`` probabilities in [0, 1].
            target: the label map ``(B, 1, spatial...)`` with ``to_onehot_y=True`` (and C > 1), else a one-hot /
                probability target ``(B, C, spatial...)``.
            out_dtype: dtype of the result; default float64 for float64 ``probs``, else float32.

        Returns:
            as :meth:`forward`.
        """
        use_labels = self.to_onehot_y and probs.shape[1] > 1
        label_offset = 0 if use_labels else -1
        if not use_labels and target.dtype == torch.bool:
            target = target.to(probs.dtype)
        if not self.include_background:
            if probs.shape[1] == 1:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
            else:
                probs = probs[:, 1:]
                if use_labels:
                    label_offset = 1
                else:
                    target = target[:, 1:]
        ace, y_total = self._ace(probs, target, label_offset)  # (B, C') float64
        return self._reduce(ace, y_total, out_dtype or _out_dtype(probs.dtype))

    def _check_shapes(self, input: torch.Tensor, target: torch.Tensor) -> bool:
        """Check types and shapes; return whether ``target`` is a label map."""
        who = type(self).__name__
        if not isinstance(target, torch.Tensor):
            raise InvalidInputError(f"{who}: target must be a torch.Tensor, got {type(target)}.")
        check_prediction(input, who)
        n_pred_ch = input.shape[1]
        use_labels = self.to_onehot_y
        if use_labels and n_pred_ch == 1:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=4)
            use_labels = False
        expected = (input.shape[0], 1, *input.shape[2:]) if use_labels else tuple(input.shape)
        if tuple(target.shape) != expected:
            if use_labels:
                hint = (
                    " Add the channel dimension with target.unsqueeze(1)."
                    if target.ndim == input.ndim - 1
                    else " Pass a label map of shape (B, 1, spatial...), or a one-hot target with to_onehot_y=False."
                )
                raise InvalidInputError(
                    f"{who}: with to_onehot_y=True the target must be a label map of shape {expected}, "
                    f"got {tuple(target.shape)}.{hint}"
                )
            hint = (
                " It looks like a label map: set to_onehot_y=True."
                if target.ndim == input.ndim and target.shape[1] == 1 and tuple(target.shape[2:]) == input.shape[2:]
                else ""
            )
            raise InvalidInputError(
                f"{who}: target must have the same shape as input {tuple(input.shape)} "
                f"(one-hot / probabilities), got {tuple(target.shape)}.{hint}"
            )
        if target.device != input.device:
            raise InvalidInputError(
                f"{who}: input is on {input.device} but target on {target.device}; move them together."
            )
        return use_labels

    def _activate(self, input: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Apply the configured activation; return (probs, whether the activation guarantees [0, 1])."""
        who = type(self).__name__
        probs = input
        activated = False
        if self.sigmoid:
            probs = torch.sigmoid(probs)
            activated = True
        if self.softmax:
            if input.shape[1] == 1:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=4)
            else:
                probs = torch.softmax(probs, 1)
                activated = True
        if self.other_act is not None:
            probs = self.other_act(probs)
            activated = False
            if not isinstance(probs, torch.Tensor) or probs.shape != input.shape:
                raise InvalidInputError(
                    f"{who}: other_act must return a tensor of the input's shape {tuple(input.shape)}, "
                    f"got {getattr(probs, 'shape', type(probs))}."
                )
            if probs.dtype not in FLOAT_DTYPES:
                raise InvalidInputError(f"{who}: other_act must return a floating point tensor, got {probs.dtype}.")
        return probs, activated

    def _validate(
        self, input: torch.Tensor, probs: torch.Tensor, activated: bool, target: torch.Tensor, use_labels: bool
    ) -> None:
        """One fused validation: a few reductions and a single device -> host copy."""
        checks = []
        # softmax/sigmoid of finite logits always lie in [0, 1]: then only the logits need a finiteness check
        if activated or probs is not input:
            checks += range_checks("input", input)
        if not activated:
            checks += range_checks("probs", probs)
        checks += label_checks(target) if use_labels else range_checks("target", target)
        values = fused_values(checks)
        if "input_min" not in values and not math.isfinite(values["probs_max"] - values["probs_min"]):
            values["input_min"], values["input_max"] = values["probs_min"], values["probs_max"]
        raise_if_bad(
            type(self).__name__,
            values,
            probs_name="the probabilities (input after the activation)" if probs is not input else "input",
            num_classes=input.shape[1],
            advice=LOSS_ADVICE,
        )

    def _reduce(self, ace: torch.Tensor, y_total: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        who = type(self).__name__
        n_classes = ace.shape[1]
        f = ace
        if self.class_weight is not None:
            w = self.class_weight.to(device=ace.device, dtype=torch.float64)
            if w.ndim == 1 and w.numel() != n_classes:
                raise InvalidInputError(
                    f"{who}: weight has {w.numel()} values but the loss sees {n_classes} classes. Give one weight per "
                    "class; with include_background=False leave out the background class 0."
                )
            f = f * w
        if self.ignore_empty_classes:
            # a class absent from an image's target is left out of the mean (not counted as a zero)
            valid = (y_total > 0).to(f.dtype)
            f = f * valid
        else:
            valid = None
        if self.reduction == LossReduction.NONE.value:
            out = f
        elif self.reduction == LossReduction.SUM.value:
            out = f.sum()
        else:
            denom = valid.sum().clamp(min=1.0) if valid is not None else float(f.numel())
            out = f.sum() / denom
        return out.to(out_dtype)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The losses answer in float32, or float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _class_weight(weight: Sequence[float] | float | int | torch.Tensor | None, who: str) -> torch.Tensor | None:
    """``weight`` as a float64 tensor (a scalar or one value per class), checked; None stays None."""
    if weight is None:
        return None
    try:
        class_weight = torch.as_tensor(weight, dtype=torch.float64).detach().clone()
    except (TypeError, ValueError, RuntimeError):
        raise InvalidInputError(f"{who}: weight must be a number or a sequence of numbers, got {weight!r}.") from None
    if class_weight.ndim > 1 or class_weight.numel() == 0:
        raise InvalidInputError(
            f"{who}: weight must be a scalar or a 1-D sequence with one value per class, "
            f"got shape {tuple(class_weight.shape)}."
        )
    if not bool(torch.isfinite(class_weight).all()) or bool((class_weight < 0).any()):
        raise InvalidInputError(f"{who}: weight values must be finite and >= 0, got {class_weight.tolist()}.")
    return class_weight


class HardL1ACELoss(L1ACELoss):
    """Hard-binned marginal L1 average calibration error (hL1-ACE) loss.

    For every image ``b`` and class channel ``c`` the probabilities are hard-binned into ``num_bins`` equal-width
    confidence bins (MONAI's ``calibration_binning`` edges and tie rule, see
    :func:`~acecal.losses.hard_binned_calibration`), and

        ``ACE[b, c] = mean over the non-empty bins m of |mean_p[b, c, m] - mean_y[b, c, m]|``

    (every non-empty bin has equal weight; empty bins are skipped). Bin membership is piecewise constant, so the
    gradient reaches the probabilities only through the bin means: an element in bin ``m`` receives
    ``sign(mean_p_m - mean_y_m) / (K * n_m)`` (``K`` non-empty bins, ``n_m`` elements in bin ``m``), times the
    reduction factor and class weight.

    Empty classes: with ``ignore_empty_classes=True`` (default) a class that is absent from an image's target (no
    foreground voxel, e.g. in a training patch) is **left out of the mean**: ``reduction="mean"`` averages over the
    valid (image, class) entries only, so the loss does not shrink as more classes are absent. This deliberately
    differs from the published code, which zeroes such entries but still counts them in the denominator. If every
    entry is excluded the loss is 0 (still connected to the graph, with zero gradient). With
    ``ignore_empty_classes=False`` an absent class's ACE pushes its probabilities towards 0 and every entry counts.

    The target may be a one-hot / probability tensor ``(B, C, spatial...)``, or with ``to_onehot_y=True`` a label map
    ``(B, 1, spatial...)``, which is used directly (no one-hot tensor is built); the target is a constant (no gradient
    flows to it). Statistics are accumulated in float64. Memory: besides the probabilities (the softmax output, which
    autograd keeps anyway) one ``uint8`` bin index per element is saved for the backward pass; no Python loop over
    batch or class.

    Args:
        num_bins: number of equal-width bins M on [0, 1]. Defaults to 20.
        include_background: if False, channel 0 (background) is excluded. Defaults to True (as in the paper's
            training configurations; the paper's metrics exclude background).
        to_onehot_y: the target is a label map ``(B, 1, spatial...)`` of class indices. Defaults to False.
        sigmoid: apply a sigmoid to ``input``. Defaults to False.
        softmax: apply a softmax over the channel dimension to ``input``. Defaults to False.
        other_act: another activation callable applied to ``input``, e.g. ``torch.tanh``. Defaults to None.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (a ``(B, C)`` tensor). Defaults to ``"mean"``.
        weight: per-class multipliers, a scalar or one value per class (without background when
            ``include_background=False``), all >= 0. Defaults to None.
        ignore_empty_classes: leave classes absent from an image's target out of the loss (see above).
            Defaults to True.
        right: MONAI's ``right`` option for values exactly on a bin edge. Defaults to False.

    Shapes:
        ``input``: ``(B, C, spatial...)``; ``target``: ``(B, C, spatial...)`` or, with ``to_onehot_y=True``,
        ``(B, 1, spatial...)``; output: ``()`` or ``(B, C)`` for ``reduction="none"``.

    Example:
        >>> loss = HardL1ACELoss(to_onehot_y=True, softmax=True)
        >>> logits = torch.randn(2, 4, 32, 32, 32, requires_grad=True)
        >>> labels = torch.randint(0, 4, (2, 1, 32, 32, 32))
        >>> loss(logits, labels).backward()

    References:
        Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
        IEEE TMI, arXiv:2506.03942; Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
        Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
    """

    def __init__(
        self,
        num_bins: int = DEFAULT_NUM_BINS,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[torch.Tensor], torch.Tensor] | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        ignore_empty_classes: bool = True,
        right: bool = False,
    ) -> None:
        super().__init__(
            num_bins,
            include_background,
            to_onehot_y,
            sigmoid,
            softmax,
            other_act,
            reduction,
            weight,
            ignore_empty_classes,
        )
        self.right = bool(right)

    def _ace(self, probs: torch.Tensor, target: torch.Tensor, label_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        sum_p, counts, sum_y, y_total = differentiable_hard_sums(probs, target, self.num_bins, self.right, label_offset)
        nonempty = counts > 0
        # |mean_p - mean_y| = |sum_p - sum_y| / n; empty bins have sum_p = sum_y = 0
        gap = (sum_p - sum_y).abs() / counts.clamp(min=1.0)
        k = nonempty.sum(-1).clamp(min=1).to(gap.dtype)
        return gap.sum(-1) / k, y_total


class SoftL1ACELoss(L1ACELoss):
    """Soft-binned marginal L1 average calibration error (sL1-ACE) loss.

    Like :class:`HardL1ACELoss`, but every probability is shared between its two neighbouring bin centres
    ``c_k = (k + 1/2) / M`` with a triangular kernel of half-width ``1/M`` (all weight to the end bin outside the
    outer centres; see :func:`~acecal.losses.soft_binned_calibration`). Per image and class,

        ``ACE[b, c] = mean over bins k with W_k >= empty_weight of |mean_p[b, c, k] - mean_y[b, c, k]|``

    with ``W_k`` the bin's total weight and weighted means ``mean_p_k = sum_i w_ik p_i / W_k``,
    ``mean_y_k = sum_i w_ik y_i / W_k``. Because the weights depend on the probabilities, the gradient also moves
    elements between bins (it reaches ``mean_y`` too); the backward pass is in closed form (see
    :mod:`acecal.losses.binning`), computed from the probabilities alone: nothing per element is saved besides the
    probabilities (the softmax output, which autograd keeps anyway) and, for a label map, a ``uint8`` copy of the
    labels.

    Soft binning calibrates harder than hard binning but can cost Dice and, in the authors' notes, break training on
    some tasks; hard binning is the safer default.

    Empty classes: with ``ignore_empty_classes=True`` (default) a class absent from an image's target is **left out
    of the mean** (see :class:`HardL1ACELoss`); this deliberately differs from the published code.

    Args:
        num_bins, include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, weight,
        ignore_empty_classes: as :class:`HardL1ACELoss`.
        empty_weight: bins whose total weight ``W_k`` is below this (or zero) are skipped. Defaults to 0.01.

    Shapes:
        as :class:`HardL1ACELoss`.

    References:
        Barfoot et al., IEEE TMI, arXiv:2506.03942; Barfoot et al., MICCAI 2024, arXiv:2403.06759.
    """

    def __init__(
        self,
        num_bins: int = DEFAULT_NUM_BINS,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[torch.Tensor], torch.Tensor] | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        ignore_empty_classes: bool = True,
        empty_weight: float = 0.01,
    ) -> None:
        super().__init__(
            num_bins,
            include_background,
            to_onehot_y,
            sigmoid,
            softmax,
            other_act,
            reduction,
            weight,
            ignore_empty_classes,
        )
        self.empty_weight = check_empty_weight(empty_weight, type(self).__name__)

    def _ace(self, probs: torch.Tensor, target: torch.Tensor, label_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        weights, sum_p, sum_y, y_total = differentiable_soft_sums(probs, target, self.num_bins, label_offset)
        nonempty = (weights >= self.empty_weight) & (weights > 0)
        safe = torch.where(nonempty, weights, torch.ones_like(weights))
        gap = torch.where(nonempty, (sum_p - sum_y).abs() / safe, torch.zeros_like(weights))
        k = nonempty.sum(-1).clamp(min=1).to(gap.dtype)
        return gap.sum(-1) / k, y_total
