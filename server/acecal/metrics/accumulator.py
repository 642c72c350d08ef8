"""Streaming calibration and Dice over a whole dataset with (classes x bins) memory per image.

:class:`CalibrationAccumulator` keeps, per image ("case"), only the hard-binning sufficient statistics
``count, sum_p, sum_y`` of shape (C, M) and the Dice counts ``tp, n_pred, n_target`` of shape (C,). They add up, so a
case may arrive in pieces (sliding-window tiles or chunks of the stitched volume) under the same ``case_id``; every
number is computed from these sums when :meth:`~CalibrationAccumulator.aggregate` is called.

Definitions (C = evaluated classes: the foreground classes unless ``include_background=True``; M bins):

**Per case and class**: ECE / ACE / MCE of :func:`acecal.metrics.errors_from_sums` (as MONAI) and Dice of
:mod:`acecal.metrics.dice` (argmax prediction). A class is *present* in a case when its target has at least one
voxel (``sum(sum_y) > 0``).

**Macro** (the per-image view; what the paper's tables call macro): for each case, the mean over the classes
*present in that case's target* (absent classes are left out, not scored as MONAI's metric scores them, which makes
their ACE the mean predicted probability); then the mean (and the standard deviation, ddof = 1) over cases. Cases with
no present class are left out. The per-class macro table is, for each class, the mean over the cases in which that
class is present.

**Micro** (the pooled view): every voxel of every case pooled per class: pooled counts, pooled
``mean_p = sum of sum_p / sum of count`` and ``mean_y = sum of sum_y / sum of count`` per bin (not an unweighted mean
of per-image bin means, which would weigh a voxel of a small image more than one of a large image), then ECE / ACE /
MCE of the pooled bins; micro Dice = 2 sum TP / (sum |pred| + sum |target|). All cases are pooled, including those in
which a class is absent (their voxels are genuine negatives). The dataset micro number is the mean over classes
present in at least one case.

**Dataset reliability histogram**: ``histogram[c, k, m]`` = number of cases (in which class c is present and
confidence bin m is occupied) whose observed frequency ``mean_y`` in bin m falls in frequency bin k (k = 0 is the
lowest; the same bin rule as probabilities, :func:`acecal.binning.bin_index`). Shape (C, M, M): rows k = observed
frequency, columns m = confidence. :func:`acecal.plots.plot_dataset_reliability_histogram` normalises each column.

**Distributed use** (DDP): either

* exact, with per-case rows: ``states = [None] * world; dist.all_gather_object(states, acc.state_dict())`` and
  ``for s in states: total.merge(s, on_duplicate="skip")`` on every rank (``"skip"`` drops the duplicate cases a
  ``DistributedSampler`` pads with), or
* cheap: ``acc.reduce(lambda t: dist.all_reduce(t))`` sums the fixed-shape summary tensors of :meth:`summary` across
  ranks; afterwards :meth:`aggregate` reports the dataset (macro, micro, per-class, histogram) of all ranks while the
  per-case rows stay the local ones. Each case must then be complete on one rank, and padded duplicates are counted
  twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from acecal.binning import DEFAULT_NUM_BINS, bin_index, bin_means
from acecal.errors import InvalidInputError
from acecal.metrics.calibration import PROB_TOLERANCE, binning_sums, errors_from_sums
from acecal.metrics.dice import dice_counts, dice_from_counts
from acecal.tensor_checks import check_count, check_num_bins, target_kind

__all__ = ["CalibrationAccumulator", "CalibrationReport", "METRICS", "evaluated_class_names"]

#: Metric names, in the order used by the summary tensors.
METRICS: Tuple[str, ...] = ("ece", "ace", "mce", "dice")

_SUMMARY_KEYS = (
    "num_cases",
    "micro_count",
    "micro_sum_p",
    "micro_sum_y",
    "micro_tp",
    "micro_n_pred",
    "micro_n_target",
    "class_sum",
    "class_sumsq",
    "class_n",
    "image_sum",
    "image_sumsq",
    "image_n",
    "histogram",
)


@dataclass
class _Case:
    count: torch.Tensor  # (C, M) int64
    sum_p: torch.Tensor  # (C, M) float64
    sum_y: torch.Tensor  # (C, M) float64
    tp: torch.Tensor  # (C,) int64
    n_pred: torch.Tensor  # (C,) int64
    n_target: torch.Tensor  # (C,) int64
    has_dice: bool


@dataclass
class CalibrationReport:
    """What :meth:`CalibrationAccumulator.aggregate` returns. Floats are Python floats (NaN when undefined).

    Attributes:
        class_names: names of the C evaluated classes.
        num_bins: M.
        num_cases: cases accumulated (all ranks after :meth:`CalibrationAccumulator.reduce`).
        macro: ``{"ece", "ace", "mce", "dice"}`` mean over cases of the per-case mean over present classes, plus
            ``"<metric>_std"`` (over cases, ddof = 1) and ``"<metric>_cases"`` (cases that entered the mean).
        micro: ``{"ece", "ace", "mce", "dice"}`` of pooled bins / pooled Dice counts, mean over classes present in at
            least one case.
        per_class: one dict per class: ``class``, ``index`` (channel in the model output), ``cases_present``,
            ``macro_<m>``, ``macro_<m>_std``, ``micro_<m>`` for m in ece, ace, mce, dice.
        per_case: one dict per local case: ``case_id``, ``ece``/``ace``/``mce``/``dice`` (mean over present
            classes), ``present_classes``, and ``classes``: {name: {"present", "ece", "ace", "mce", "dice"}} for every
            class (absent ones computed as MONAI does; Dice 0 if predicted but absent, NaN if in neither).
        histogram: (C, M, M) int64 dataset reliability histogram (rows: observed-frequency bin, columns: confidence
            bin).
        micro_count, micro_mean_p, micro_mean_y: (C, M) pooled bins (int64, float64, float64; NaN in empty bins), the
            data of a dataset reliability diagram.
    """

    class_names: List[str]
    num_bins: int
    num_cases: int
    macro: Dict[str, float]
    micro: Dict[str, float]
    per_class: List[Dict[str, Any]]
    per_case: List[Dict[str, Any]]
    histogram: torch.Tensor
    micro_count: torch.Tensor
    micro_mean_p: torch.Tensor
    micro_mean_y: torch.Tensor
    reduced: bool = False

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (tensors as nested lists; NaN stays float('nan'), write with ``allow_nan`` or convert)."""
        return {
            "class_names": list(self.class_names),
            "num_bins": self.num_bins,
            "num_cases": self.num_cases,
            "macro": dict(self.macro),
            "micro": dict(self.micro),
            "per_class": [dict(r) for r in self.per_class],
            "per_case": [dict(r) for r in self.per_case],
            "histogram": self.histogram.tolist(),
            "micro_count": self.micro_count.tolist(),
            "micro_mean_p": self.micro_mean_p.tolist(),
            "micro_mean_y": self.micro_mean_y.tolist(),
            "reduced": self.reduced,
        }


def _nan() -> float:
    return float("nan")


def evaluated_class_names(
    num_classes: int, num_bins: int, include_background: bool, class_names: Optional[Sequence[str]]
) -> List[str]:
    """Check an accumulator's arguments; the names of the evaluated classes (channel 0 left out unless
    ``include_background``). ``class_names`` names all ``num_classes`` channels or the evaluated ones only; default
    ``"class_<channel>"``."""
    check_count(num_classes, "num_classes")
    check_num_bins(num_bins)
    if not include_background and num_classes < 2:
        raise InvalidInputError("include_background=False needs at least 2 classes (background + one)")
    first = 0 if include_background else 1
    if class_names is None:
        return [f"class_{i}" for i in range(first, num_classes)]
    names = [str(n) for n in class_names]
    if len(names) == num_classes:
        return names[first:]
    if len(names) != num_classes - first:
        raise InvalidInputError(
            f"class_names has {len(names)} names; expected {num_classes} (all channels) or {num_classes - first} "
            "(evaluated channels)"
        )
    return names


class CalibrationAccumulator:
    """Accumulate ECE/ACE/MCE, Dice and reliability data over a dataset, one image (or tile) at a time.

    Args:
        num_classes: C, the number of probability channels of the model (background included).
        num_bins: M.
        include_background: evaluate channel 0 too (default False: metrics exclude the background, as the paper).
        class_names: names of all ``num_classes`` channels, or of the evaluated ones only; default ``"class_<i>"``.

    Memory: 3 x C x M numbers + 3 x C counts per case (about 1 KiB per case for 4 classes and 20 bins).

    Example::

        acc = CalibrationAccumulator(num_classes=4, class_names=["background", "RV", "Myo", "LV"])
        for batch in loader:                                   # any batch size
            probs = torch.softmax(model(batch["image"]), 1)    # (B, 4, x, y, z)
            acc.update(probs, batch["label"], case_id=batch["id"])  # label map (B, 1, x, y, z)
        report = acc.aggregate()
        report.macro["ace"], report.micro["ace"], report.histogram
    """

    def __init__(
        self,
        num_classes: int,
        num_bins: int = DEFAULT_NUM_BINS,
        include_background: bool = False,
        class_names: Optional[Sequence[str]] = None,
    ) -> None:
        names = evaluated_class_names(num_classes, num_bins, include_background, class_names)
        self.num_classes = num_classes
        self.num_bins = num_bins
        self.include_background = bool(include_background)
        self.first_channel = 0 if include_background else 1
        self.num_eval = num_classes - self.first_channel
        self.class_names: List[str] = names
        self._cases: Dict[str, _Case] = {}
        self._auto = 0
        self._reduced: Optional[Dict[str, torch.Tensor]] = None

    # ------------------------------------------------------------------ input
    def __len__(self) -> int:
        return len(self._cases)

    @property
    def case_ids(self) -> List[str]:
        """Ids of the local cases, in order of first arrival."""
        return list(self._cases)

    def reset(self) -> None:
        """Forget every case (and any reduced summary)."""
        self._cases.clear()
        self._auto = 0
        self._reduced = None

    def _ids(self, case_id: Union[None, str, Sequence[str]], batch: int) -> List[str]:
        if case_id is None:
            ids = []
            for _ in range(batch):
                while f"case_{self._auto:05d}" in self._cases:
                    self._auto += 1
                ids.append(f"case_{self._auto:05d}")
                self._auto += 1
            return ids
        if isinstance(case_id, (str, int)):
            if batch != 1:
                raise InvalidInputError(f"one case_id given for a batch of {batch} images; pass one id per image")
            return [str(case_id)]
        ids = [str(c) for c in case_id]
        if len(ids) != batch:
            raise InvalidInputError(f"{len(ids)} case ids given for a batch of {batch} images")
        if len(set(ids)) != len(ids):
            raise InvalidInputError(f"duplicate case ids within one batch: {ids}")
        return ids

    def update(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        case_id: Union[None, str, Sequence[str]] = None,
        *,
        predicted: Optional[torch.Tensor] = None,
    ) -> List[str]:
        """Add a batch of images (or tiles/chunks of images).

        Args:
            probs: (B, C, spatial...) probabilities in [0, 1] for all ``num_classes`` channels (softmax output).
            labels: label map (B, 1, spatial...) / (B, spatial...), or one-hot (B, C, spatial...).
            case_id: one id per image (a str when B == 1, a sequence otherwise); None makes new ids. An id that is
                already present *adds* to that case: feed disjoint pieces of one image under one id (for sliding
                windows: stitched probabilities, never overlapping raw tiles, so no voxel counts twice).
            predicted: the predicted label map (B, 1, spatial...) the Dice is scored on; None = the argmax of
                ``probs``. A two-head network's segmentation head gives the labels and its calibration head the
                probabilities, so the two can differ.

        Returns:
            The case ids used.

        Raises:
            ValueError: shapes, NaN, probabilities outside [0, 1], labels outside [0, C).
        """
        if not isinstance(probs, torch.Tensor) or probs.ndim < 3:
            raise InvalidInputError(
                f"probs must be a tensor (B, C, spatial...), got {getattr(probs, 'shape', type(probs).__name__)}"
            )
        if probs.shape[1] != self.num_classes:
            raise InvalidInputError(
                f"probs has {probs.shape[1]} channels but the accumulator was built for {self.num_classes} classes"
            )
        count, sum_p, sum_y = binning_sums(probs, labels, self.num_bins, include_background=self.include_background)
        if target_kind(probs, labels, "labels") == "onehot":
            target = labels.detach()
        else:
            target = labels.detach().reshape(probs.shape[0], 1, *probs.shape[2:])
        tp, n_pred, n_target = dice_counts(probs if predicted is None else predicted, target, self.num_classes)
        f = self.first_channel
        ids = self._ids(case_id, probs.shape[0])
        for i, cid in enumerate(ids):
            self._add(
                cid,
                count[i].cpu(),
                sum_p[i].cpu(),
                sum_y[i].cpu(),
                tp[i, f:].cpu(),
                n_pred[i, f:].cpu(),
                n_target[i, f:].cpu(),
            )
        return ids

    def update_sums(
        self,
        count: torch.Tensor,
        sum_p: torch.Tensor,
        sum_y: torch.Tensor,
        *,
        tp: Optional[torch.Tensor] = None,
        n_pred: Optional[torch.Tensor] = None,
        n_target: Optional[torch.Tensor] = None,
        case_id: Optional[str] = None,
    ) -> str:
        """Add precomputed sums of one image or one disjoint piece of it.

        Args:
            count, sum_p, sum_y: (C, M) from :func:`acecal.metrics.binning_sums` (one image of its (B, C, M) output);
                C may be ``num_classes`` (channel 0 is dropped when the background is excluded) or the evaluated
                classes only.
            tp, n_pred, n_target: (C,) Dice counts from :func:`acecal.metrics.dice_counts`, all three or none; a
                case that never receives them has Dice NaN.
            case_id: the case these sums belong to; pieces with the same id add up. None makes a new case.

        Returns:
            The case id used.
        """
        c_expect = (self.num_classes, self.num_eval)

        def prep(x: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
            if not isinstance(x, torch.Tensor):
                raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            x = x.detach().cpu()
            if x.ndim == ndim + 1 and x.shape[0] == 1:
                x = x[0]
            if x.ndim != ndim or x.shape[0] not in c_expect or (ndim == 2 and x.shape[1] != self.num_bins):
                want = f"(C, {self.num_bins})" if ndim == 2 else "(C,)"
                raise InvalidInputError(
                    f"{name} must have shape {want} with C in {sorted(set(c_expect))}, got {tuple(x.shape)}"
                )
            if x.shape[0] != self.num_eval:
                x = x[self.first_channel :]
            if x.numel() and not bool(torch.isfinite(x.to(torch.float64)).all()):
                raise InvalidInputError(f"{name} contains NaN or infinite values")
            if x.numel() and float(x.min()) < 0:
                raise InvalidInputError(f"{name} must be non-negative")
            return x

        count = prep(count, "count", 2)
        if count.is_floating_point() and not bool((count == count.round()).all()):
            raise InvalidInputError("count must hold whole numbers")
        count = count.to(torch.int64)
        sum_p = prep(sum_p, "sum_p", 2).to(torch.float64)
        sum_y = prep(sum_y, "sum_y", 2).to(torch.float64)
        cf = count.to(torch.float64)
        slack = PROB_TOLERANCE * cf + 1e-6
        if bool((sum_p > cf + slack).any()) or bool((sum_y > cf + slack).any()):
            raise InvalidInputError("sum_p and sum_y cannot exceed count in any bin (probabilities are <= 1)")
        if tp is None and n_pred is None and n_target is None:
            z = torch.zeros(self.num_eval, dtype=torch.int64)
            dtp, dnp, dnt, has = z, z.clone(), z.clone(), False
        elif tp is None or n_pred is None or n_target is None:
            raise InvalidInputError("pass all three Dice counts (tp, n_pred, n_target) or none")
        else:
            dtp, dnp, dnt = (
                prep(d, n, 1).round().to(torch.int64)
                for d, n in ((tp, "tp"), (n_pred, "n_pred"), (n_target, "n_target"))
            )
            has = True
        cid = self._ids(case_id, 1)[0]
        self._add(cid, count, sum_p, sum_y, dtp, dnp, dnt, has_dice=has)
        return cid

    def _add(
        self,
        cid: str,
        count: torch.Tensor,
        sum_p: torch.Tensor,
        sum_y: torch.Tensor,
        tp: torch.Tensor,
        n_pred: torch.Tensor,
        n_target: torch.Tensor,
        has_dice: bool = True,
    ) -> None:
        self._reduced = None
        rec = self._cases.get(cid)
        if rec is None:
            self._cases[cid] = _Case(
                count.clone(), sum_p.clone(), sum_y.clone(), tp.clone(), n_pred.clone(), n_target.clone(), has_dice
            )
            return
        rec.count += count
        rec.sum_p += sum_p
        rec.sum_y += sum_y
        rec.tp += tp
        rec.n_pred += n_pred
        rec.n_target += n_target
        rec.has_dice = rec.has_dice or has_dice

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything, as CPU tensors plus the list of case ids (picklable; for ``all_gather_object``/``torch.save``).

        Keys: ``num_classes``, ``num_bins``, ``include_background`` (ints), ``class_names``, ``case_ids`` (lists),
        ``count`` (N, C, M) int64, ``sum_p``/``sum_y`` (N, C, M) float64, ``tp``/``n_pred``/``n_target`` (N, C)
        int64, ``has_dice`` (N,) bool.
        """
        recs = list(self._cases.values())
        c, m = self.num_eval, self.num_bins

        def stack(name: str, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            if not recs:
                return torch.zeros((0, *shape), dtype=dtype)
            return torch.stack([getattr(r, name) for r in recs])

        return {
            "num_classes": self.num_classes,
            "num_bins": self.num_bins,
            "include_background": int(self.include_background),
            "class_names": list(self.class_names),
            "case_ids": list(self._cases),
            "count": stack("count", (c, m), torch.int64),
            "sum_p": stack("sum_p", (c, m), torch.float64),
            "sum_y": stack("sum_y", (c, m), torch.float64),
            "tp": stack("tp", (c,), torch.int64),
            "n_pred": stack("n_pred", (c,), torch.int64),
            "n_target": stack("n_target", (c,), torch.int64),
            "has_dice": torch.tensor([r.has_dice for r in recs], dtype=torch.bool),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CalibrationAccumulator:
        """A new accumulator holding the cases of ``state``."""
        acc = cls(
            int(state["num_classes"]),
            int(state["num_bins"]),
            bool(state["include_background"]),
            class_names=state.get("class_names"),
        )
        acc.merge(state)
        return acc

    def merge(self, other: Union[CalibrationAccumulator, Mapping[str, Any]], on_duplicate: str = "error") -> None:
        """Add the cases of another accumulator (or of its :meth:`state_dict`) to this one.

        Args:
            other: an accumulator with the same ``num_classes``, ``num_bins`` and ``include_background``.
            on_duplicate: what to do with a case id present in both: ``"error"`` (default), ``"skip"`` (keep ours;
                right for the duplicates a ``DistributedSampler`` pads with) or ``"add"`` (the two are disjoint pieces
                of one image).
        """
        if on_duplicate not in ("error", "skip", "add"):
            raise InvalidInputError(f"on_duplicate must be 'error', 'skip' or 'add', got {on_duplicate!r}")
        state = other.state_dict() if isinstance(other, CalibrationAccumulator) else other
        cfg = (int(state["num_classes"]), int(state["num_bins"]), bool(state["include_background"]))
        if cfg != (self.num_classes, self.num_bins, self.include_background):
            raise InvalidInputError(
                f"cannot merge an accumulator with (num_classes, num_bins, include_background) = {cfg} into one with "
                f"{(self.num_classes, self.num_bins, self.include_background)}"
            )
        ids = list(state["case_ids"])
        dups = [i for i in ids if i in self._cases]
        if dups and on_duplicate == "error":
            raise InvalidInputError(
                f"{len(dups)} case id(s) present on both sides (e.g. {dups[:3]}); use on_duplicate='skip' for the "
                "duplicates a DistributedSampler pads with, or 'add' for pieces of one image"
            )
        for i, cid in enumerate(ids):
            if cid in self._cases and on_duplicate == "skip":
                continue
            self._add(
                cid,
                state["count"][i].to(torch.int64),
                state["sum_p"][i].to(torch.float64),
                state["sum_y"][i].to(torch.float64),
                state["tp"][i].to(torch.int64),
                state["n_pred"][i].to(torch.int64),
                state["n_target"][i].to(torch.int64),
                has_dice=bool(state["has_dice"][i]),
            )

    def case_bins(self, case_id: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean_p, mean_y, count)`` (C, M) of one case: the data of its reliability diagram."""
        if case_id not in self._cases:
            raise KeyError(f"no case {case_id!r}; known: {list(self._cases)[:5]}...")
        rec = self._cases[case_id]
        mean_p, mean_y = bin_means(rec.count, rec.sum_p, rec.sum_y)
        return mean_p, mean_y, rec.count.clone()

    # ------------------------------------------------------------------ metrics
    def _stacked(self) -> Tuple[torch.Tensor, ...]:
        st = self.state_dict()
        return st["count"], st["sum_p"], st["sum_y"], st["tp"], st["n_pred"], st["n_target"], st["has_dice"]

    def _case_values(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(4, N, C) per-case metric values [ece, ace, mce, dice] and (N, C) presence mask."""
        count, sum_p, sum_y, tp, n_pred, n_target, has_dice = self._stacked()
        err = errors_from_sums(count, sum_p, sum_y)
        dice = dice_from_counts(tp, n_pred, n_target)
        dice = torch.where(has_dice.view(-1, 1), dice, torch.full_like(dice, float("nan")))
        values = torch.stack([err["ece"], err["ace"], err["mce"], dice])
        present = sum_y.sum(-1) > 0
        return values, present

    def summary(self) -> Dict[str, torch.Tensor]:
        """Fixed-shape float64/int64 CPU tensors that add up across disjoint sets of cases (e.g. DDP ranks).

        ``num_cases`` (1,); ``micro_count`` (C, M); ``micro_sum_p``/``micro_sum_y`` (C, M); ``micro_tp``/
        ``micro_n_pred``/``micro_n_target`` (C,); ``class_sum``/``class_sumsq``/``class_n`` (4, C): per class, sum,
        sum of squares and number of the per-case values over cases where the class is present (metrics in
        :data:`METRICS` order); ``image_sum``/``image_sumsq``/``image_n`` (4,): the same over cases of the per-case
        mean over present classes; ``histogram`` (C, M, M).
        """
        c, m = self.num_eval, self.num_bins
        count, sum_p, sum_y, tp, n_pred, n_target, _ = self._stacked()
        values, present = self._case_values()  # (4, N, C), (N, C)
        valid = present.unsqueeze(0) & ~torch.isnan(values)
        v0 = torch.where(valid, values, torch.zeros_like(values))
        n_cls = valid.sum(-1)  # (4, N)
        img = torch.where(
            n_cls > 0, v0.sum(-1) / n_cls.clamp(min=1), torch.full(n_cls.shape, float("nan"), dtype=torch.float64)
        )
        img_ok = ~torch.isnan(img)
        img0 = torch.where(img_ok, img, torch.zeros_like(img))
        # Dataset reliability histogram: per class c, confidence bin m, the frequency bin k of each case's mean_y.
        _, mean_y = bin_means(count, sum_p, sum_y)  # (N, C, M)
        ok = present.unsqueeze(-1) & (count > 0)
        k = bin_index(torch.nan_to_num(mean_y), m)
        cls = torch.arange(c).view(1, c, 1)
        col = torch.arange(m).view(1, 1, m)
        flat = ((cls * m + k) * m + col)[ok]
        hist = torch.bincount(flat, minlength=c * m * m).view(c, m, m)
        return {
            "num_cases": torch.tensor([count.shape[0]], dtype=torch.int64),
            "micro_count": count.sum(0),
            "micro_sum_p": sum_p.sum(0),
            "micro_sum_y": sum_y.sum(0),
            "micro_tp": tp.sum(0),
            "micro_n_pred": n_pred.sum(0),
            "micro_n_target": n_target.sum(0),
            "class_sum": v0.sum(1),
            "class_sumsq": (v0 * v0).sum(1),
            "class_n": valid.sum(1).to(torch.int64),
            "image_sum": img0.sum(-1),
            "image_sumsq": (img0 * img0).sum(-1),
            "image_n": img_ok.sum(-1).to(torch.int64),
            "histogram": hist,
        }

    def reduce(
        self, all_reduce_fn: Callable[[torch.Tensor], Any], device: Union[str, torch.device, None] = None
    ) -> None:
        """Sum the :meth:`summary` tensors across processes; :meth:`aggregate` then reports all of them.

        Args:
            all_reduce_fn: called once per summary tensor (in a fixed order, the same on every rank) and must sum it
                across ranks, either in place (``torch.distributed.all_reduce``; its return value is ignored unless
                it is a tensor) or by returning the summed tensor.
            device: where the tensors are moved before the call (e.g. ``"cuda"`` for NCCL); default CPU.

        Any later :meth:`update`/:meth:`merge` discards the reduced summary. Per-case rows stay local.
        """
        local = self.summary()
        out: Dict[str, torch.Tensor] = {}
        for key in _SUMMARY_KEYS:
            t = local[key].contiguous()
            if device is not None:
                t = t.to(device)
            r = all_reduce_fn(t)
            r = r if isinstance(r, torch.Tensor) else t
            if r.shape != local[key].shape:
                raise InvalidInputError(f"all_reduce_fn changed the shape of {key}: {tuple(r.shape)}")
            out[key] = r.detach().cpu().to(local[key].dtype)
        self._reduced = out

    def aggregate(self) -> CalibrationReport:
        """Macro, micro, per-class, per-case numbers and the dataset reliability histogram (module docstring)."""
        s = self._reduced if self._reduced is not None else self.summary()
        names = self.class_names

        def ratio(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            n = n.to(torch.float64)
            return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))

        def std(total: torch.Tensor, sq: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            nf = n.to(torch.float64)
            mean = total / nf.clamp(min=1)
            var = (sq - nf * mean * mean).clamp(min=0) / (nf - 1).clamp(min=1)
            return torch.where(nf > 1, var.sqrt(), torch.full_like(var, float("nan")))

        img_mean = ratio(s["image_sum"], s["image_n"])
        img_std = std(s["image_sum"], s["image_sumsq"], s["image_n"])
        macro: Dict[str, float] = {}
        for i, name in enumerate(METRICS):
            macro[name] = float(img_mean[i])
            macro[f"{name}_std"] = float(img_std[i])
            macro[f"{name}_cases"] = int(s["image_n"][i])
        cls_mean = ratio(s["class_sum"], s["class_n"])  # (4, C)
        cls_std = std(s["class_sum"], s["class_sumsq"], s["class_n"])
        micro_err = errors_from_sums(s["micro_count"], s["micro_sum_p"], s["micro_sum_y"])
        micro_dice = dice_from_counts(s["micro_tp"], s["micro_n_pred"], s["micro_n_target"])
        micro_vals = torch.stack([micro_err["ece"], micro_err["ace"], micro_err["mce"], micro_dice])  # (4, C)
        seen = s["micro_sum_y"].sum(-1) > 0  # class present in at least one case
        micro: Dict[str, float] = {}
        for i, name in enumerate(METRICS):
            v = micro_vals[i][seen & ~torch.isnan(micro_vals[i])]
            micro[name] = float(v.mean()) if v.numel() else _nan()
        per_class = []
        for c, cname in enumerate(names):
            row: Dict[str, Any] = {
                "class": cname,
                "index": c + self.first_channel,
                "cases_present": int(s["class_n"][1, c]),
            }
            for i, name in enumerate(METRICS):
                row[f"macro_{name}"] = float(cls_mean[i, c])
                row[f"macro_{name}_std"] = float(cls_std[i, c])
                row[f"micro_{name}"] = float(micro_vals[i, c])
            per_class.append(row)
        per_case = self._per_case_rows()
        mean_p, mean_y = bin_means(s["micro_count"], s["micro_sum_p"], s["micro_sum_y"])
        return CalibrationReport(
            class_names=list(names),
            num_bins=self.num_bins,
            num_cases=int(s["num_cases"][0]),
            macro=macro,
            micro=micro,
            per_class=per_class,
            per_case=per_case,
            histogram=s["histogram"].clone(),
            micro_count=s["micro_count"].clone(),
            micro_mean_p=mean_p,
            micro_mean_y=mean_y,
            reduced=self._reduced is not None,
        )

    def _per_case_rows(self) -> List[Dict[str, Any]]:
        if not self._cases:
            return []
        values, present = self._case_values()
        rows = []
        for n, cid in enumerate(self._cases):
            row: Dict[str, Any] = {"case_id": cid, "present_classes": int(present[n].sum())}
            for i, name in enumerate(METRICS):
                v = values[i, n][present[n] & ~torch.isnan(values[i, n])]
                row[name] = float(v.mean()) if v.numel() else _nan()
            row["classes"] = {
                cname: {
                    "present": bool(present[n, c]),
                    **{name: float(values[i, n, c]) for i, name in enumerate(METRICS)},
                }
                for c, cname in enumerate(self.class_names)
            }
            rows.append(row)
        return rows
