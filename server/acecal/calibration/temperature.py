"""Temperature scaling (Guo et al., ICML 2017): the post-hoc calibration baseline.

One scalar T > 0 divides every logit: ``softmax(z / T)``. T > 1 softens an over-confident model, T < 1 sharpens an
under-confident one; the argmax (hence the segmentation and its Dice) never changes. T is fitted on validation
logits of a frozen network by minimising the mean negative log-likelihood (categorical cross-entropy over voxels)

    NLL(T) = mean_i [ logsumexp_c(z_ic / T) - z_i,y_i / T ]

with L-BFGS (strong-Wolfe line search) on log T, run to convergence. The objective is convex in 1/T, so the optimum is
unique. Loss and gradient are computed in float64, chunk by chunk, without autograd graphs, so validation sets of
whole 3D volumes can be passed as an iterable of per-case tensors without concatenating them; each L-BFGS evaluation
is one pass over the data (``max_voxels_per_case`` subsamples each case once, up front, to bound memory and time).

Store the fitted T with the model (``BundleConfig.temperature``) and apply it at inference with
:func:`apply_temperature` (or ``sliding_window_logits(..., temperature=T)``).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, List, Optional, Tuple, Union

import torch

from acecal.errors import InvalidInputError

__all__ = ["fit_temperature", "apply_temperature", "temperature_nll", "DEFAULT_BOUNDS"]

#: Default admissible range of T. A fitted value at a bound means the data push T further (e.g. perfectly
#: separated logits drive T towards 0); a warning says so.
DEFAULT_BOUNDS: Tuple[float, float] = (0.05, 20.0)

_CHUNK = 1 << 21  # logits per chunk in the float64 loss pass (~16 MiB per temporary)

Pair = Tuple[torch.Tensor, torch.Tensor]


def _pieces_from_tensor(logits: torch.Tensor, labels: torch.Tensor) -> List[Pair]:
    """Split (N, C) or (B, C, spatial...) logits into per-case (C, n) views with (n,) labels."""
    if not isinstance(labels, torch.Tensor):
        raise InvalidInputError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.ndim == 2:
        if tuple(labels.shape) not in ((logits.shape[0],), (logits.shape[0], 1)):
            raise InvalidInputError(
                f"labels of shape {tuple(labels.shape)} do not fit logits (N, C) = {tuple(logits.shape)}; "
                f"expected ({logits.shape[0]},)"
            )
        return [(logits.t(), labels.reshape(-1))]
    if logits.ndim >= 3:
        b, c, *spatial = logits.shape
        if tuple(labels.shape) not in ((b, *spatial), (b, 1, *spatial)):
            raise InvalidInputError(
                f"labels of shape {tuple(labels.shape)} do not fit logits (B, C, spatial...) = {tuple(logits.shape)}; "
                f"expected {(b, *spatial)} or {(b, 1, *spatial)}"
            )
        lab = labels.reshape(b, -1)
        z = logits.reshape(b, c, -1)
        return [(z[i], lab[i]) for i in range(b)]
    raise InvalidInputError(f"logits must be (N, C) or (B, C, spatial...), got shape {tuple(logits.shape)}")


def _piece_from_case(item: object, index: int) -> Pair:
    """One case (C, spatial...) logits with (spatial...) or (1, spatial...) labels -> (C, n), (n,)."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise InvalidInputError(f"case {index}: expected a (logits, labels) pair, got {type(item).__name__}")
    z, y = item
    if not isinstance(z, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InvalidInputError(f"case {index}: logits and labels must be torch.Tensors")
    if z.ndim < 2:
        raise InvalidInputError(f"case {index}: logits must be (C, spatial...), got shape {tuple(z.shape)}")
    spatial = tuple(z.shape[1:])
    if tuple(y.shape) not in (spatial, (1, *spatial)):
        raise InvalidInputError(
            f"case {index}: labels of shape {tuple(y.shape)} do not fit logits (C, spatial...) = {tuple(z.shape)}; "
            f"expected {spatial} or {(1, *spatial)}"
        )
    return z.reshape(z.shape[0], -1), y.reshape(-1)


def _prepare(
    pieces: Iterable[Pair], ignore_index: Optional[int], max_voxels: Optional[int], generator: torch.Generator
) -> Tuple[List[Pair], int, int]:
    """Validate every piece; drop ignored voxels; subsample. Returns [(z (C, n) float, y (n,) int64)], N, C."""
    out: List[Pair] = []
    total = 0
    num_classes = -1
    for i, (z, y) in enumerate(pieces):
        z = z.detach()
        y = y.detach()
        if not z.is_floating_point():
            raise InvalidInputError(f"case {i}: logits must be floating point, got {z.dtype}")
        if num_classes < 0:
            num_classes = z.shape[0]
        elif z.shape[0] != num_classes:
            raise InvalidInputError(f"case {i}: {z.shape[0]} classes, earlier cases had {num_classes}")
        if num_classes < 2:
            raise InvalidInputError(f"temperature scaling needs at least 2 classes, got {num_classes}")
        if y.is_floating_point():
            if y.numel() and not bool((y == y.round()).all()):
                raise InvalidInputError(f"case {i}: labels must be integer class indices (found non-integers or NaN)")
        y = y.to(torch.int64)
        if ignore_index is not None:
            keep = y != ignore_index
            if not bool(keep.all()):
                z, y = z[:, keep], y[keep]
        if y.numel() == 0:
            continue
        lo, hi = torch.aminmax(y)
        if int(lo) < 0 or int(hi) >= num_classes:
            raise InvalidInputError(f"case {i}: labels in [{int(lo)}, {int(hi)}], expected [0, {num_classes - 1}]")
        if not bool(torch.isfinite(z).all()):
            raise InvalidInputError(f"case {i}: logits contain NaN or infinite values")
        if max_voxels is not None and y.numel() > max_voxels:
            sel = torch.randperm(y.numel(), generator=generator)[:max_voxels].to(y.device)
            z, y = z[:, sel], y[sel]
        out.append((z, y))
        total += y.numel()
    if total == 0:
        raise InvalidInputError("no labelled voxels to fit a temperature on (empty input, or everything ignored)")
    return out, total, num_classes


def _nll_and_grad(pieces: List[Pair], beta: float, total: int) -> Tuple[float, float]:
    """Mean NLL at inverse temperature ``beta`` and its derivative d NLL / d beta (float64, chunked)."""
    loss = 0.0
    dbeta = 0.0
    for z, y in pieces:
        c, n = z.shape
        step = max(1, _CHUNK // c)
        for s in range(0, n, step):
            zc = z[:, s : s + step].to(torch.float64)
            zy = zc.gather(0, y[s : s + step].view(1, -1)).squeeze(0)
            sc = zc * beta
            lse = torch.logsumexp(sc, 0)
            prob = torch.exp(sc - lse)
            ez = (prob * zc).sum(0)
            loss += float((lse - beta * zy).sum())
            dbeta += float((ez - zy).sum())
    return loss / total, dbeta / total


def temperature_nll(
    logits: Union[torch.Tensor, Iterable[Pair]],
    labels: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    *,
    ignore_index: Optional[int] = None,
) -> float:
    """Mean NLL of ``softmax(logits / temperature)`` (same inputs as :func:`fit_temperature`)."""
    t = _check_temperature(temperature)
    pieces, total, _ = _prepare(_iter_pieces(logits, labels), ignore_index, None, torch.Generator().manual_seed(0))
    return _nll_and_grad(pieces, 1.0 / t, total)[0]


def _iter_pieces(logits: Union[torch.Tensor, Iterable[Pair]], labels: Optional[torch.Tensor]) -> Iterable[Pair]:
    if isinstance(logits, torch.Tensor):
        if labels is None:
            raise InvalidInputError("labels are required when logits is a tensor")
        return _pieces_from_tensor(logits, labels)
    if labels is not None:
        raise InvalidInputError("pass labels inside the (logits, labels) pairs when logits is an iterable of cases")
    if isinstance(logits, (str, bytes)) or not hasattr(logits, "__iter__"):
        raise InvalidInputError(
            f"logits must be a tensor or an iterable of (logits, labels) pairs, got {type(logits).__name__}"
        )
    return (_piece_from_case(item, i) for i, item in enumerate(logits))


def fit_temperature(
    logits: Union[torch.Tensor, Iterable[Pair]],
    labels: Optional[torch.Tensor] = None,
    *,
    max_iter: int = 100,
    bounds: Tuple[float, float] = DEFAULT_BOUNDS,
    init: float = 1.0,
    ignore_index: Optional[int] = None,
    max_voxels_per_case: Optional[int] = None,
    seed: int = 0,
) -> float:
    """Fit one temperature T > 0 minimising the mean NLL of ``softmax(logits / T)``.

    Args:
        logits: either a tensor, (N, C) with ``labels`` (N,), or (B, C, spatial...) with ``labels`` (B, spatial...)
            or (B, 1, spatial...); or an iterable of per-case pairs ``(logits (C, spatial...), labels (spatial...) or
            (1, spatial...))`` with ``labels=None``. Pairs are kept by reference, not concatenated.
        labels: integer class indices (see above).
        max_iter: L-BFGS iterations (each evaluates NLL and gradient in one pass over the data; it stops earlier
            once the gradient or the change of T is negligible).
        bounds: (low, high) admissible T; the result is clipped into it, with a warning if the optimum lies outside.
        init: starting T.
        ignore_index: label value to leave out (e.g. unlabelled voxels).
        max_voxels_per_case: if set, a seeded random subsample of at most this many voxels per case is used.
        seed: seed of that subsample.

    Returns:
        The temperature T as a Python float, ``bounds[0] <= T <= bounds[1]``.

    Raises:
        ValueError: NaN/inf logits, labels outside [0, C), fewer than 2 classes, no labelled voxel, bad shapes,
            bounds or init.
    """
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise InvalidInputError(f"bounds must satisfy 0 < low < high, got {bounds!r}")
    t0 = _check_temperature(init, "init")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise InvalidInputError(f"max_iter must be a positive integer, got {max_iter!r}")
    if max_voxels_per_case is not None and max_voxels_per_case < 1:
        raise InvalidInputError(f"max_voxels_per_case must be >= 1, got {max_voxels_per_case!r}")
    gen = torch.Generator().manual_seed(int(seed))
    pieces, total, _ = _prepare(_iter_pieces(logits, labels), ignore_index, max_voxels_per_case, gen)

    # Optimise u = log T. Outside [log lo - 1, log hi + 1] the objective is held flat (gradient 0) so that
    # separable data (optimum T -> 0) cannot drive exp(-u) to overflow; the result is clipped to bounds anyway.
    u_lo, u_hi = math.log(lo) - 1.0, math.log(hi) + 1.0
    u = torch.tensor([min(max(math.log(t0), u_lo), u_hi)], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        uv = float(u.detach())
        uc = min(max(uv, u_lo), u_hi)
        beta = math.exp(-uc)
        loss, dbeta = _nll_and_grad(pieces, beta, total)
        grad = -beta * dbeta if uc == uv else 0.0  # d/du = d/dbeta * dbeta/du, dbeta/du = -beta
        u.grad = torch.tensor([grad], dtype=torch.float64)
        return torch.tensor(loss, dtype=torch.float64)

    opt.step(closure)
    t = math.exp(float(u.detach()))
    if not math.isfinite(t):  # pragma: no cover - guarded by the flat region above
        raise InvalidInputError("temperature fit diverged")
    if t < lo or t > hi:
        warnings.warn(
            f"the NLL-optimal temperature ({t:.4g}) lies outside the bounds {bounds}; clipping. "
            "Perfectly separated validation logits push T towards 0.",
            RuntimeWarning,
            stacklevel=2,
        )
        t = min(max(t, lo), hi)
    return t


def _check_temperature(temperature: Union[float, torch.Tensor], name: str = "temperature") -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidInputError(f"{name} must be a positive number, got {temperature!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise InvalidInputError(f"{name} must be a finite number > 0, got {t}")
    return t


def apply_temperature(logits: torch.Tensor, temperature: Union[float, torch.Tensor]) -> torch.Tensor:
    """``logits / T`` (any shape, same dtype and device); follow with softmax over the class dimension.

    Raises:
        ValueError: T not a finite number > 0.
    """
    if not isinstance(logits, torch.Tensor):
        raise InvalidInputError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    t = _check_temperature(temperature)
    return logits / t
