"""Argument checks shared by the losses and the metrics: tensor shapes and dtypes, value ranges, label maps, bins.

Value checks are *fused*: each check contributes named 0-d tensors (a minimum, a maximum, a flag), :func:`fused_values`
copies all of them to the host in one synchronisation, and :func:`raise_if_bad` turns them into an
:class:`~acecal.errors.InvalidInputError` (a ``ValueError``) that says what was wrong and what to do. So a loss on a GPU
checks its inputs with a handful of reductions and a single device -> host copy::

    checks = range_checks("probs", probs) + label_checks(labels)
    raise_if_bad("MyLoss", fused_values(checks), num_classes=probs.shape[1])

Messages start with ``who`` (the caller's name) when one is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from acecal.errors import InvalidInputError

__all__ = [
    "FLOAT_DTYPES",
    "LOSS_ADVICE",
    "check_batched",
    "check_count",
    "check_empty_weight",
    "check_num_bins",
    "check_prediction",
    "check_term_weight",
    "fused_values",
    "label_checks",
    "plain_tensor",
    "raise_if_bad",
    "range_checks",
    "target_kind",
]

#: Floating dtypes a prediction (logits or probabilities) may have.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: What :func:`raise_if_bad` advises a loss's caller (a metric's caller gets the defaults).
LOSS_ADVICE: Mapping[str, str] = {
    "nan": "Check the network output for divergence (lower the learning rate, use gradient clipping, or check AMP "
    "loss scaling).",
    "probs_range": "Pass probabilities, or pass logits with softmax=True (or sigmoid=True) so the loss applies the "
    "activation itself.",
    "target_range": "For a label map of shape (B, 1, spatial...) set to_onehot_y=True.",
}
_DEFAULT_ADVICE: Mapping[str, str] = {
    "nan": "",
    "probs_range": "Apply softmax/sigmoid to logits first.",
    "target_range": "Pass a label map as (B, 1, spatial...) instead.",
}


def _prefix(who: str | None) -> str:
    return f"{who}: " if who else ""


def plain_tensor(t: Any) -> Any:
    """A tensor subclass (e.g. MONAI's ``MetaTensor``) as a plain ``torch.Tensor`` view, still attached to the
    autograd graph, so element-wise work runs without per-operation metadata handling; anything else unchanged."""
    if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor:
        return t.as_subclass(torch.Tensor)
    return t


def check_num_bins(num_bins: Any, who: str | None = None, *, max_bins: int | None = None) -> int:
    """``num_bins`` as an int >= 1 (and <= ``max_bins`` when given), else :class:`InvalidInputError`."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise InvalidInputError(f"{_prefix(who)}num_bins must be an integer >= 1, got {num_bins!r}.")
    if max_bins is not None and num_bins > max_bins:
        raise InvalidInputError(
            f"{_prefix(who)}num_bins must be <= {max_bins}, got {num_bins}; 20 is the usual choice."
        )
    return int(num_bins)


def check_count(value: Any, name: str, minimum: int = 1, who: str | None = None, hint: str = "") -> int:
    """An integer (not a bool) >= ``minimum``, e.g. a number of classes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{_prefix(who)}{name} must be an integer >= {minimum}{hint}, got {value!r}.")
    return int(value)


def check_term_weight(value: Any, name: str, who: str | None = None) -> float:
    """The weight of a loss term: a finite int or float >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"{_prefix(who)}{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def check_empty_weight(empty_weight: Any, who: str | None = None) -> float:
    """Soft binning's ``empty_weight``: anything ``float()`` accepts, finite and >= 0."""
    try:
        value = float(empty_weight)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{_prefix(who)}empty_weight must be a non-negative number, got {empty_weight!r}."
        ) from None
    if not (math.isfinite(value) and value >= 0.0):
        raise InvalidInputError(
            f"{_prefix(who)}empty_weight must be a finite number >= 0, got {empty_weight!r} (default 0.01)."
        )
    return value


def check_batched(x: Any, who: str | None = None, name: str = "input", shape: str = "(B, C, spatial...)") -> None:
    """``x`` is a tensor with a batch, a channel and at least one spatial dimension (``shape`` says which)."""
    p = _prefix(who)
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{p}{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim < 3:
        raise InvalidInputError(
            f"{p}{name} must have shape {shape}: at least 3 dimensions, one of them spatial, "
            f"got shape {tuple(x.shape)}."
        )


def check_prediction(x: Any, who: str | None = None, name: str = "input", *, allow_empty: bool = False) -> None:
    """``x`` is a floating tensor of shape ``(B, C, spatial...)`` (at least 3 dimensions), non-empty unless
    ``allow_empty``. Values are not looked at (see :func:`range_checks`)."""
    check_batched(x, who, name)
    if x.dtype not in FLOAT_DTYPES:
        raise InvalidInputError(f"{_prefix(who)}{name} must be a floating point tensor, got dtype {x.dtype}.")
    if not allow_empty and x.numel() == 0:
        raise InvalidInputError(f"{_prefix(who)}{name} must not be empty, got shape {tuple(x.shape)}.")


def target_kind(probs: torch.Tensor, target: Any, name: str = "target") -> Literal["onehot", "labels"]:
    """``"onehot"`` if ``target`` has the shape of ``probs`` (B, C, spatial...), ``"labels"`` for a label map
    (B, 1, spatial...) or (B, spatial...); :class:`InvalidInputError` otherwise. With C == 1 the target is one-hot."""
    if not isinstance(target, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.shape == probs.shape:
        return "onehot"
    b, _, *spatial = probs.shape
    if tuple(target.shape) in ((b, 1, *spatial), (b, *spatial)):
        return "labels"
    raise InvalidInputError(
        f"{name} shape {tuple(target.shape)} does not fit probabilities of shape {tuple(probs.shape)}: expected a "
        f"one-hot {tuple(probs.shape)} or a label map {(b, 1, *spatial)}"
    )


def range_checks(prefix: str, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``prefix_min`` and ``prefix_max`` of ``x`` (NaN propagates into both); bool is read as 0/1."""
    t = x.detach()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    lo, hi = torch.aminmax(t)
    return [(prefix + "_min", lo), (prefix + "_max", hi)]


def label_checks(label: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Range of a label map and, for a floating one, whether any value is not an integer (NaN counts as one)."""
    checks = range_checks("label", label)
    if label.is_floating_point():
        lab = label.detach()
        checks.append(("label_nonint", (lab != torch.round(lab)).any()))
    return checks


def fused_values(checks: Sequence[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """The named 0-d tensors of ``checks`` as floats, with a single device -> host copy."""
    if not checks:
        return {}
    values = torch.stack([t.detach().to(torch.float64).reshape(()) for _, t in checks]).tolist()
    return {name: v for (name, _), v in zip(checks, values, strict=True)}


def raise_if_bad(
    who: str | None,
    values: Mapping[str, float],
    *,
    input_name: str = "input",
    probs_name: str = "probabilities",
    label_name: str = "label map",
    num_classes: int | None = None,
    tolerance: float = 0.0,
    advice: Mapping[str, str] = _DEFAULT_ADVICE,
) -> None:
    """Raise :class:`InvalidInputError` for the first failed check among the fused ``values``.

    Keys (each optional, from :func:`range_checks` / :func:`label_checks`): ``input_*`` (logits: finite),
    ``probs_*`` (no NaN, within ``[-tolerance, 1 + tolerance]``), ``target_*`` (one-hot / probability target: finite,
    within [0, 1]), ``label_*`` (finite, integer, class indices in [0, num_classes - 1] when ``num_classes`` is given).
    ``advice`` completes the messages (:data:`LOSS_ADVICE` for a loss).
    """
    p = _prefix(who)

    def hint(key: str) -> str:
        text = advice.get(key, "")
        return f" {text}" if text else ""

    if "input_min" in values:
        lo, hi = values["input_min"], values["input_max"]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InvalidInputError(
                f"{p}{input_name} contains NaN or infinite values (min={lo}, max={hi}).{hint('nan')}"
            )
    if "probs_min" in values:
        lo, hi = values["probs_min"], values["probs_max"]
        if math.isnan(lo) or math.isnan(hi):
            raise InvalidInputError(f"{p}{probs_name} contain NaN values.{hint('nan')}")
        if not (lo >= -tolerance and hi <= 1.0 + tolerance):
            raise InvalidInputError(
                f"{p}{probs_name} must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}].{hint('probs_range')}"
            )
    if "target_min" in values:
        lo, hi = values["target_min"], values["target_max"]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InvalidInputError(f"{p}target contains NaN or infinite values (min={lo}, max={hi}).")
        if not (lo >= 0.0 and hi <= 1.0):
            raise InvalidInputError(
                f"{p}a one-hot / probability target must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]."
                f"{hint('target_range')}"
            )
    if "label_min" in values:
        lo, hi = values["label_min"], values["label_max"]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InvalidInputError(f"{p}{label_name} contains NaN or infinite values (min={lo}, max={hi}).")
        if values.get("label_nonint", 0.0) != 0.0:
            raise InvalidInputError(
                f"{p}{label_name} contains non-integer values (range [{lo}, {hi}]). Resample label maps with "
                "nearest-neighbour interpolation, or round them."
            )
        if num_classes is not None and not (lo >= 0 and hi <= num_classes - 1):
            raise InvalidInputError(
                f"{p}{label_name} values must be class indices in [0, {num_classes - 1}] for {num_classes} classes, "
                f"got labels in [{int(lo)}, {int(hi)}]. Check the number of output channels of the network against "
                "the labels."
            )
