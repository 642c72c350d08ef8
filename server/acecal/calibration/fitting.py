"""Fitting calibrators for ACE on a frozen network's model-space logits.

- :func:`macro_ace`: the metric itself, computed the way :class:`acecal.metrics.CalibrationAccumulator` computes its
  macro ACE (hard binning, 20 equal-width bins, per image and foreground class, mean over the classes present in
  the image, then mean over images), fast enough to be an objective.
- :func:`fit_ace_temperature`: one global temperature minimising :func:`macro_ace` by a bounded 1-D search: a grid on
  log T over ``bounds``, then a finer grid around the best point (the objective is piecewise constant in T, so
  derivative-based searches stall; ties go to the T closest to 1).
- :func:`fit_local_temperature`: local temperature scaling (Ding et al., ICCV 2021) trained with the project's own
  soft-binned L1-ACE loss (:class:`acecal.losses.SoftL1ACELoss`) on ``softmax(logits / T(x))``, optionally plus
  ``nll_weight`` x cross-entropy, one case per step (the loss is per image, as the metric), Adam. It starts from the
  ACE-fitted global temperature, so before training it is that calibrator.

Cases are :class:`CalibrationCase` records: the raw model-space logits (C, x, y, z) of a case the network never
trained on, its label map (x, y, z) and its normalised image (Cin, x, y, z).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from acecal.calibration.calibrators import T_MAX, T_MIN, Calibrator, LocalTemperatureCalibrator, TemperatureCalibrator
from acecal.calibration.threshold import NUM_BINS as TOP_BINS, top_label_bins, uncertainty_threshold
from acecal.errors import InvalidInputError
from acecal.losses import SoftL1ACELoss
from acecal.metrics import binning_sums, dice_counts, dice_from_counts, errors_from_sums
from acecal.metrics.error_detection import NUM_HIST_BINS, auroc_from_histograms, confidence_bins, roi_mask

__all__ = [
    "CalibrationCase",
    "macro_ace",
    "case_metrics",
    "fit_ace_temperature",
    "fit_local_temperature",
    "served_threshold",
    "error_auroc",
    "LTS_DEFAULTS",
    "ACE_T_BOUNDS",
]

NUM_BINS = 20
#: Search range of the ACE-fitted global temperature.
ACE_T_BOUNDS = (0.25, 4.0)
#: Defaults of :func:`fit_local_temperature` (architecture and training); the bundle records what was used. Chosen by
#: two-fold cross-validation inside one half of the hippocampus validation split (docs/training.md, "Calibrators"):
#: one 3x3x3 layer of 4 channels on the logits alone beat larger nets, dilated ones, per-voxel (1x1x1) ones and ones
#: that also see the image, which overfit and lost error-detection AUROC; 0.1 x NLL keeps training stable.
LTS_DEFAULTS: dict[str, Any] = {
    "hidden": 4,
    "layers": 1,
    "kernel_size": 3,
    "dilation": 1,
    "use_image": False,
    "logit_scale": 0.1,
    "epochs": 20,
    "lr": 1e-2,
    "weight_decay": 0.0,
    "loss_bins": 20,
    "nll_weight": 0.1,
    "seed": 0,
    "keep_best": True,
    "clip_grad": 1.0,
    "ranking_tolerance": 0.005,
}


@dataclass
class CalibrationCase:
    """One held-out case in model space."""

    name: str
    logits: torch.Tensor  # (C, x, y, z) float32, raw (uncalibrated) network logits
    label: torch.Tensor  # (x, y, z) integer label map
    image: Optional[torch.Tensor] = None  # (Cin, x, y, z) the normalised image the logits came from
    # (x, y, z) the served label map when it is not argmax(logits): a two-head network's segmentation head
    prediction: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.logits.ndim != 4:
            raise InvalidInputError(f"case {self.name}: logits must be (C, x, y, z), got {tuple(self.logits.shape)}")
        if tuple(self.label.shape) != tuple(self.logits.shape[1:]):
            raise InvalidInputError(
                f"case {self.name}: label {tuple(self.label.shape)} does not fit logits {tuple(self.logits.shape)}"
            )
        if self.image is not None and tuple(self.image.shape[1:]) != tuple(self.logits.shape[1:]):
            raise InvalidInputError(
                f"case {self.name}: image {tuple(self.image.shape)} does not fit logits {tuple(self.logits.shape)}"
            )
        if self.prediction is not None and tuple(self.prediction.shape) != tuple(self.logits.shape[1:]):
            raise InvalidInputError(
                f"case {self.name}: prediction {tuple(self.prediction.shape)} does not fit "
                f"logits {tuple(self.logits.shape)}"
            )

    def batch(self, device: Any = "cpu") -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(logits (1, C, ...), image (1, Cin, ...) or None, label (1, 1, ...) int64) on ``device``."""
        img = None if self.image is None else self.image[None].to(device, torch.float32)
        return self.logits[None].to(device, torch.float32), img, self.label[None, None].to(device, torch.int64)


def _check_cases(cases: Sequence[CalibrationCase]) -> list[CalibrationCase]:
    cases = list(cases)
    if not cases:
        raise InvalidInputError("no cases to fit or measure a calibrator on")
    c = cases[0].logits.shape[0]
    if c < 2 or any(k.logits.shape[0] != c for k in cases):
        raise InvalidInputError("every case must have the same number (>= 2) of logit channels")
    return cases


@torch.no_grad()
def _case_ace(probs: torch.Tensor, label: torch.Tensor, num_bins: int) -> Optional[float]:
    """Macro hard ACE of one image: mean over the foreground classes present in ``label`` (None if none is)."""
    count, sum_p, sum_y = binning_sums(probs, label, num_bins, include_background=False)
    ace = errors_from_sums(count, sum_p, sum_y)["ace"][0]  # (C - 1,)
    present = sum_y[0].sum(-1) > 0
    if not bool(present.any()):
        return None
    return float(ace[present].mean())


@torch.no_grad()
def case_metrics(
    cases: Sequence[CalibrationCase], calibrator: Optional[Calibrator] = None, *, num_bins: int = NUM_BINS
) -> dict[str, dict[str, Optional[float]]]:
    """Per case: ``{"ace": macro hard ACE, "dice": macro Dice}`` of ``softmax(calibrator(logits))`` (raw if None).

    Dice is the served segmentation's (``case.prediction``, else the argmax), over the foreground classes present in
    the case (it does not depend on the calibrator; reported to show it).
    """
    out = {}
    for case in _check_cases(cases):
        z, img, y = case.batch()
        if calibrator is not None:
            z = calibrator.calibrate(z, img)
        p = torch.softmax(z, dim=1)
        seg = p if case.prediction is None else case.prediction[None, None].long()
        tp, n_pred, n_target = dice_counts(seg, y, p.shape[1])
        dice = dice_from_counts(tp, n_pred, n_target)[0, 1:]
        present = n_target[0, 1:] > 0
        out[case.name] = {
            "ace": _case_ace(p, y, num_bins),
            "dice": float(dice[present].mean()) if bool(present.any()) else None,
        }
    return out


def macro_ace(
    cases: Sequence[CalibrationCase], calibrator: Optional[Calibrator] = None, *, num_bins: int = NUM_BINS
) -> float:
    """Mean over cases of the per-case macro hard ACE (cases without a present foreground class left out)."""
    vals = [m["ace"] for m in case_metrics(cases, calibrator, num_bins=num_bins).values() if m["ace"] is not None]
    return float(sum(vals) / len(vals)) if vals else float("nan")


@torch.no_grad()
def fit_ace_temperature(
    cases: Sequence[CalibrationCase],
    *,
    bounds: tuple[float, float] = ACE_T_BOUNDS,
    coarse_points: int = 49,
    fine_points: int = 41,
    num_bins: int = NUM_BINS,
) -> tuple[TemperatureCalibrator, dict]:
    """The global temperature minimising the macro hard ACE of ``softmax(logits / T)`` over ``cases``.

    Returns:
        ``(calibrator, info)``; info holds ``temperature``, ``ace`` (the objective at it), ``raw_ace`` (at T = 1)
        and ``evaluations``.
    """
    cases = _check_cases(cases)
    lo, hi = (float(b) for b in bounds)
    if not (T_MIN <= lo < hi <= T_MAX):
        raise InvalidInputError(f"bounds must satisfy {T_MIN} <= low < high <= {T_MAX}, got {bounds!r}")
    prepared = []
    for c in cases:
        z, _, y = c.batch()
        prepared.append((z, y))
    memo: dict[float, float] = {}

    def objective(log_t: float) -> float:
        key = round(log_t, 12)
        if key not in memo:
            t = math.exp(log_t)
            vals = [v for z, y in prepared if (v := _case_ace(torch.softmax(z / t, dim=1), y, num_bins)) is not None]
            memo[key] = sum(vals) / len(vals) if vals else float("nan")
        return memo[key]

    def best_of(points: list[float]) -> float:
        # the minimum; among equal values the log T closest to 0 (T closest to 1)
        return min(points, key=lambda u: (objective(u), abs(u)))

    a, b = math.log(lo), math.log(hi)
    coarse = [a + (b - a) * i / (coarse_points - 1) for i in range(coarse_points)]
    u0 = best_of(coarse + ([0.0] if a <= 0.0 <= b else []))
    step = (b - a) / (coarse_points - 1)
    fine = [min(max(u0 - step + 2 * step * i / (fine_points - 1), a), b) for i in range(fine_points)]
    u = best_of(fine + [u0])
    t = math.exp(u)
    info = {
        "temperature": t,
        "ace": objective(u),
        "raw_ace": objective(0.0),
        "bounds": [lo, hi],
        "evaluations": len(memo),
        "objective": f"macro hard ACE, {num_bins} bins, foreground classes",
    }
    return TemperatureCalibrator(t), info


class _ErrorRanking:
    """AUROC of 1 - confidence for "voxel is wrong" over ``cases`` (pooled), as ``acecal evaluate`` defines it
    (:mod:`acecal.metrics.error_detection`: within the predicted and true foreground dilated by its default radius).
    The ROIs do not depend on the calibrator (the label map never changes), so they are computed once."""

    def __init__(self, cases: Sequence[CalibrationCase]):
        self.cases = list(cases)
        self.rois: list[np.ndarray] = []  # the voxels where errors are counted, per case
        self.wrong: list[np.ndarray] = []
        self.preds: list[torch.Tensor] = []
        for c in self.cases:
            pred = c.logits.argmax(0) if c.prediction is None else c.prediction.long()
            self.preds.append(pred)
            pred_np, truth = pred.numpy(), c.label.numpy()
            self.rois.append(roi_mask((pred_np > 0) | (truth > 0)))
            self.wrong.append(np.not_equal(pred_np, truth))

    @torch.no_grad()
    def __call__(self, calibrator: Optional[Calibrator] = None) -> float:
        hw = np.zeros(NUM_HIST_BINS, np.int64)
        hr = np.zeros(NUM_HIST_BINS, np.int64)
        for c, roi, wrong, pred in zip(self.cases, self.rois, self.wrong, self.preds, strict=True):
            z, img, _ = c.batch()
            if calibrator is not None:
                z = calibrator.calibrate(z, img)
            # the served confidence: the probability of the served label (the argmax's for one head)
            conf = torch.softmax(z, dim=1)[0].gather(0, pred[None])[0].numpy()
            b = confidence_bins(conf)[roi]
            w = wrong[roi]
            hw += np.bincount(b[w], minlength=NUM_HIST_BINS)
            hr += np.bincount(b[~w], minlength=NUM_HIST_BINS)
        return auroc_from_histograms(hw, hr)[0]


def error_auroc(cases: Sequence[CalibrationCase], calibrator: Optional[Calibrator] = None) -> float:
    """AUROC of 1 - confidence for "voxel is wrong", pooled over ``cases`` (see :class:`_ErrorRanking`)."""
    return _ErrorRanking(_check_cases(cases))(calibrator)


@torch.no_grad()
def served_threshold(
    cases: Sequence[CalibrationCase], calibrator: Optional[Calibrator] = None, *, target: float = 0.9
) -> float:
    """The bundle's default uncertainty threshold for the calibrated confidence, by the rule training uses
    (:func:`acecal.calibration.threshold.uncertainty_threshold`: the lowest top-label confidence bin edge from which
    every populated bin of ``cases`` was right at least ``target`` of the time)."""
    cases = _check_cases(cases)
    counts = torch.zeros(TOP_BINS, dtype=torch.int64)
    right = torch.zeros(TOP_BINS, dtype=torch.int64)
    for case in cases:
        z, img, y = case.batch()
        if calibrator is not None:
            z = calibrator.calibrate(z, img)
        pred = None if case.prediction is None else case.prediction[None, None].long()
        c, r = top_label_bins(torch.softmax(z, dim=1), y, predicted=pred)
        counts += c
        right += r
    return uncertainty_threshold(counts, right, target=target, num_classes=cases[0].logits.shape[0])


def fit_local_temperature(
    cases: Sequence[CalibrationCase],
    *,
    init_temperature: Optional[float] = None,
    hidden: int = LTS_DEFAULTS["hidden"],
    layers: int = LTS_DEFAULTS["layers"],
    kernel_size: int = LTS_DEFAULTS["kernel_size"],
    dilation: int = LTS_DEFAULTS["dilation"],
    use_image: bool = LTS_DEFAULTS["use_image"],
    logit_scale: float = LTS_DEFAULTS["logit_scale"],
    epochs: int = LTS_DEFAULTS["epochs"],
    lr: float = LTS_DEFAULTS["lr"],
    weight_decay: float = LTS_DEFAULTS["weight_decay"],
    loss_bins: int = LTS_DEFAULTS["loss_bins"],
    nll_weight: float = LTS_DEFAULTS["nll_weight"],
    seed: int = LTS_DEFAULTS["seed"],
    keep_best: bool = LTS_DEFAULTS["keep_best"],
    clip_grad: Optional[float] = LTS_DEFAULTS["clip_grad"],
    ranking_tolerance: Optional[float] = LTS_DEFAULTS["ranking_tolerance"],
    device: Any = "cpu",
    monitor: Optional[Sequence[CalibrationCase]] = None,
    progress: Optional[Callable[[dict], None]] = None,
) -> tuple[LocalTemperatureCalibrator, dict]:
    """Train a :class:`LocalTemperatureCalibrator` on ``cases`` with the soft-binned L1-ACE loss.

    Args:
        init_temperature: T(x) at the start; None fits the ACE temperature on ``cases`` first and starts there.
        hidden, layers, kernel_size, dilation, use_image, logit_scale: the network (see the calibrator).
        epochs: passes over the cases (shuffled each epoch with ``seed``), one optimiser step per case.
        lr, weight_decay: Adam(W).
        loss_bins: bins of the soft-binned ACE loss (the metric uses 20 hard bins).
        nll_weight: weight of a cross-entropy term added to the ACE loss (0 = ACE only).
        keep_best: return the weights, among the start (the global temperature) and the end of every epoch, with the
            lowest macro hard ACE on ``cases`` (the fitting cases: the soft-binned loss can jump to a worse state).
        clip_grad: clip the gradient norm of each step to this (None: no clipping).
        ranking_tolerance: with ``keep_best``, an epoch's weights are eligible only if their AUROC of 1 - confidence
            for "voxel is wrong" on ``cases`` is at most this below the start's: a per-voxel temperature can lower
            ACE by scrambling which voxels are the least confident, which makes the confidence useless for finding
            errors (None: no such guard).
        monitor: cases on which the macro hard ACE is recorded after every epoch (diagnostics only; never used to
            pick weights here).
        progress: called with ``{"epoch", "loss", "fit_ace", "monitor_ace"}`` after every epoch.

    Returns:
        ``(calibrator, info)`` with the training record (losses per epoch, the start temperature, the settings).
    """
    cases = _check_cases(cases)
    if use_image and any(c.image is None for c in cases):
        raise InvalidInputError("use_image needs every case's image")
    if not isinstance(epochs, int) or epochs < 0:
        raise InvalidInputError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not (nll_weight >= 0 and math.isfinite(nll_weight)):
        raise InvalidInputError(f"nll_weight must be >= 0, got {nll_weight!r}")
    start_info = None
    if init_temperature is None:
        _, start_info = fit_ace_temperature(cases)
        init_temperature = start_info["temperature"]
    torch.manual_seed(seed)
    c0 = cases[0]
    cal = LocalTemperatureCalibrator(
        c0.logits.shape[0],
        1 if c0.image is None else c0.image.shape[0],
        hidden=hidden,
        layers=layers,
        kernel_size=kernel_size,
        dilation=dilation,
        use_image=use_image,
        logit_scale=logit_scale,
        init_temperature=float(init_temperature),
    ).to(device)
    ace_loss = SoftL1ACELoss(num_bins=loss_bins, include_background=False, to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(cal.parameters(), lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    order = list(range(len(cases)))
    history = []
    # keep_best: the epoch with the lowest fit ACE (epoch 0: the starting calibrator); unused otherwise
    best_ace = macro_ace(cases, cal.cpu()) if keep_best else math.inf
    best_state: dict[str, torch.Tensor] = {k: v.clone() for k, v in cal.state_dict().items()} if keep_best else {}
    best_epoch: Optional[int] = 0 if keep_best else None
    ranking = _ErrorRanking(cases) if keep_best and ranking_tolerance is not None else None
    start_auroc = ranking(cal) if ranking is not None else math.nan
    cal.to(device)
    for epoch in range(1, epochs + 1):
        cal.train()
        rng.shuffle(order)
        total = 0.0
        for i in order:
            z, img, y = cases[i].batch(device)
            out = cal(z, img)
            loss = ace_loss(out, y)
            if nll_weight:
                loss = loss + nll_weight * torch.nn.functional.cross_entropy(out, y[:, 0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(cal.parameters(), clip_grad)
            opt.step()
            total += float(loss.detach())
        rec = {"epoch": epoch, "loss": total / len(cases)}
        if keep_best:
            rec["fit_ace"] = macro_ace(cases, cal.cpu())
            eligible = True
            if ranking is not None:
                rec["fit_auroc"] = ranking(cal)
                tolerance = ranking_tolerance or 0.0  # set: there is a ranking
                eligible = not rec["fit_auroc"] < start_auroc - tolerance  # NaN (no wrong voxel): eligible
            if eligible and rec["fit_ace"] < best_ace:
                best_ace, best_epoch = rec["fit_ace"], epoch
                best_state = {k: v.clone() for k, v in cal.state_dict().items()}
        if monitor:
            rec["monitor_ace"] = macro_ace(monitor, cal.cpu())
        cal.to(device)
        history.append(rec)
        if progress is not None:
            progress(rec)
    cal = cal.cpu().eval()
    if keep_best:
        cal.load_state_dict(best_state)
    info = {
        "init_temperature": float(init_temperature),
        "init_fit": start_info,
        "settings": {
            "hidden": hidden,
            "layers": layers,
            "kernel_size": kernel_size,
            "dilation": dilation,
            "use_image": use_image,
            "logit_scale": logit_scale,
            "epochs": epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "loss_bins": loss_bins,
            "nll_weight": nll_weight,
            "seed": seed,
            "keep_best": keep_best,
            "clip_grad": clip_grad,
            "ranking_tolerance": ranking_tolerance,
            "loss": "SoftL1ACELoss (foreground classes)" + (f" + {nll_weight} x NLL" if nll_weight else ""),
        },
        "history": history,
        "best_epoch": best_epoch,
        "fit_ace": best_ace if keep_best else None,
        "start_auroc": start_auroc if ranking is not None else None,
    }
    return cal, info
