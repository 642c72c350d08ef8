"""Validation and evaluation passes: sliding-window logits -> softmax -> streaming calibration metrics.

One function, :func:`run_pass`, serves the engine's validation (every N epochs, sharded over DDP ranks), the final
pass before publishing (temperature fitting, uncertainty threshold) and ``acecal evaluate``.

Metrics: macro over foreground classes (background excluded) with ``M = 20`` hard bins, through
``acecal.metrics.CalibrationAccumulator``. Besides it we keep a top-label histogram (confidence = max softmax
probability, correct = argmax equals the label), which sets the bundle's ``uncertainty_threshold``
(:mod:`acecal.calibration.threshold`).

Two-head networks: the label map (Dice, "correct") is the segmentation head's argmax; the probabilities (ACE, ECE,
MCE, the confidence of the top-label bins = the calibration head's probability of that label) are the calibration
head's, as served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from acecal.bundles import BundleConfig
from acecal.calibration.threshold import NUM_BINS, top_label_bins
from acecal.formatting import finite_or_none
from acecal.inference.window import sliding_window_logits
from acecal.metrics import CalibrationAccumulator
from acecal.networks import is_two_head, split_heads
from acecal.protocol import METRIC_NAMES
from acecal.tensor_checks import plain_tensor
from acecal.training.ddp import DistContext
from acecal.training.progress import Cancelled, CancelToken, is_cancelled


@dataclass
class PassResult:
    accumulator: CalibrationAccumulator
    top_counts: torch.Tensor  # (NUM_BINS,) int64: voxels per top-label confidence bin
    top_correct: torch.Tensor  # (NUM_BINS,) int64: of which the argmax was right
    cases: list[str] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # (1, C, ...) per case, when collected
    labels: list[torch.Tensor] = field(default_factory=list)  # (1, 1, ...) per case, when collected


def make_accumulator(
    num_classes: int, num_bins: int = NUM_BINS, class_names: Optional[Sequence[str]] = None
) -> CalibrationAccumulator:
    return CalibrationAccumulator(num_classes, num_bins=num_bins, include_background=False, class_names=class_names)


def case_items(dataset: Any) -> Iterator[dict]:
    """Validation items from a (Cache)Dataset of model-space cases: a batch of one, the case name attached."""
    for i in range(len(dataset)):
        d = dataset[i]
        yield {"image": d["image"][None], "label": d["label"][None], "case": d.get("case", str(i))}


@torch.no_grad()
def run_pass(
    network: torch.nn.Module,
    items: Iterable[dict],
    config: BundleConfig,
    *,
    temperature: Optional[float] = None,
    collect_logits: bool = False,
    cancel: CancelToken = None,
    on_case: Optional[Any] = None,
    tta: Optional[str] = None,
) -> PassResult:
    """Run the network over ``items`` ({"image": (1, Cin, ...), "label": (1, 1, ...), "case": name}) in model space.

    Logits from :func:`acecal.inference.window.sliding_window_logits` (the serving path; ``tta`` None = the bundle's
    test-time augmentation), divided by ``temperature`` when given, softmax, then the accumulator (one update per
    case, ``case_id`` = the case name). Two-head networks: Dice of the segmentation head's labels, calibration of the
    calibration head's probabilities; ``collect_logits`` keeps the whole (1, 2C, ...) output.
    """
    two_head = is_two_head(config)
    was_training = network.training
    network.eval()
    acc = make_accumulator(config.num_classes, class_names=config.class_names)
    counts = torch.zeros(NUM_BINS, dtype=torch.int64)
    right = torch.zeros(NUM_BINS, dtype=torch.int64)
    out = PassResult(acc, counts, right)
    try:
        for item in items:
            if is_cancelled(cancel):
                raise Cancelled()
            image, label = item["image"], item["label"]
            if image.ndim == 4:
                image, label = image[None], label[None]
            name = item.get("case")
            if isinstance(name, (list, tuple)):
                name = name[0]
            # MetaTensor -> plain tensor (no per-op metadata overhead)
            image, label = plain_tensor(image), plain_tensor(label)
            logits = sliding_window_logits(network, image, config, temperature=temperature, tta=tta)
            seg_logits, cal_logits = split_heads(logits, config.num_classes, two_head=two_head)
            probs = torch.softmax(cal_logits, dim=1)
            predicted = seg_logits.argmax(dim=1, keepdim=True) if two_head else None
            lab = torch.as_tensor(label).to(probs.device).long()
            acc.update(
                probs.cpu(), lab.cpu(), case_id=str(name), predicted=None if predicted is None else predicted.cpu()
            )
            c, r = top_label_bins(probs, lab, predicted=predicted)
            counts += c
            right += r
            out.cases.append(str(name))
            if collect_logits:
                out.logits.append(torch.as_tensor(logits).cpu())
                out.labels.append(lab.cpu())
            if on_case is not None:
                on_case(str(name))
    finally:
        network.train(was_training)
    return out


def reduce_pass(result: PassResult, ctx: DistContext) -> PassResult:
    """Combine the per-rank passes (each rank saw its own shard of the validation cases) on every rank."""
    if not ctx.distributed:
        return result
    ctx.all_reduce_sum(result.top_counts)
    ctx.all_reduce_sum(result.top_correct)
    acc = result.accumulator
    merged = make_accumulator(acc.num_classes, acc.num_bins, class_names=acc.class_names)
    for state in ctx.gather_objects(acc.state_dict()):  # exact: every rank gets every case's row
        merged.merge(state, on_duplicate="skip")
    result.accumulator = merged
    result.cases = [c for cs in ctx.gather_objects(result.cases) for c in cs]
    return result


def summarise(result: PassResult) -> dict:
    """Macro metrics {"dice", "ace", "ece", "mce"} from a pass, as plain floats (None when undefined)."""
    return metrics_from_report(result.accumulator.aggregate())


def metrics_from_report(report: Any) -> dict:
    """The macro Dice/ACE/ECE/MCE of a ``CalibrationReport``."""
    return {k: finite_or_none(report.macro.get(k)) for k in METRIC_NAMES}
