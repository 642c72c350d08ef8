"""Held-out cases in model space for fitting calibrators: raw logits, label map and image, cached on disk.

The logits come from :func:`acecal.inference.window.sliding_window_logits` after the bundle's model-space transforms
(the chain shared with training and serving), i.e. exactly what the predictor hands to the calibrator: for a two-head
bundle the calibration head's logits, with the segmentation head's label map as the served prediction. Running the
network is the slow part, so each case's tensors are cached under ``<cache_dir>/<bundle id>-<weights digest>/``;
the weights digest changes with the network, so a stale cache cannot be read for another network.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from acecal.bundles import Bundle
from acecal.bundles.registry import default_data_dir
from acecal.calibration.fitting import CalibrationCase
from acecal.data.datasets import Case
from acecal.data.transforms import model_space_transforms
from acecal.inference.window import sliding_window_logits
from acecal.networks import is_two_head, split_heads
from acecal.storage.files import atomic_write
from acecal.tensor_checks import plain_tensor

__all__ = ["model_space_cases", "weights_digest", "default_cache_dir"]


def default_cache_dir() -> Path:
    return default_data_dir() / "cache" / "logits"


def weights_digest(bundle: Bundle) -> str:
    h = hashlib.sha256()
    with open(bundle.weights_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def model_space_cases(
    bundle: Bundle,
    cases: Sequence[Case],
    *,
    cache_dir: Optional[Path] = None,
    device: str = "cpu",
    progress: Optional[Callable[[str, bool], None]] = None,
) -> list[CalibrationCase]:
    """Raw model-space logits, labels and images of labelled ``cases`` for ``bundle`` (cached when ``cache_dir``).

    Args:
        cache_dir: folder of the cache (None: no cache).
        progress: called with (case name, whether it came from the cache).
    """
    two_head = is_two_head(bundle.config)

    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / f"{bundle.id}-{weights_digest(bundle)}"
        folder.mkdir(parents=True, exist_ok=True)
    net: Optional[torch.nn.Module] = None
    chain: Optional[Callable[[dict], dict]] = None
    out = []
    for case in cases:
        if case.label is None:
            raise ValueError(f"case {case.name} has no label map")
        path = None if folder is None else folder / f"{hashlib.sha256(case.name.encode()).hexdigest()[:24]}.pt"
        rec = None
        if path is not None and path.is_file():
            try:
                rec = torch.load(path, map_location="cpu", weights_only=True)
                if rec.get("name") != case.name:
                    rec = None
            except Exception:  # noqa: BLE001 - a damaged cache file, whatever torch.load raises, is recomputed
                rec = None
        cached = rec is not None
        if rec is None:
            if net is None or chain is None:
                net = bundle.load_network(device)
                chain = model_space_transforms(bundle.config)
            d = chain(case.as_dict())
            image = plain_tensor(d["image"]).float()
            logits = sliding_window_logits(net, image[None], bundle.config)[0].cpu()
            rec = {
                "name": case.name,
                "image": image.contiguous(),
                "label": plain_tensor(d["label"])[0].to(torch.uint8).contiguous(),
            }
            if two_head:
                seg, logits = split_heads(logits, bundle.config.num_classes, dim=0)
                rec["prediction"] = seg.argmax(0).to(torch.uint8).contiguous()
            rec["logits"] = logits.contiguous()
            if path is not None:  # a cache: a crash may lose it, never tear it
                atomic_write(path, partial(torch.save, rec), durable=False)
        pred = rec.get("prediction")
        out.append(
            CalibrationCase(
                case.name,
                rec["logits"].float(),
                rec["label"].long(),
                rec["image"].float(),
                None if pred is None else pred.long(),
            )
        )
        if progress is not None:
            progress(case.name, cached)
    return out
