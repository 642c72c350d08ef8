"""Synthetic labelled volumes whose right answer is known, shared by the training, evaluation and server tests.

Every case is a noisy volume with bright, well separated blobs:

- 2 classes: background ~ N(0, noise), a bright sphere (label 1) ~ N(1, noise);
- 3 classes: additionally a dimmer ellipsoid (label 2) ~ N(0.5, noise) in the other half of the volume.

The whole image is then multiplied by a random per-case scale (1..50), like the raw, unnormalised intensities of real
MRI, so the model's z-score normalisation is exercised. Arrays are numpy (z, y, x) as SimpleITK gives them.

Import in tests as ``from synthetic import ...`` (``Testing/`` is on ``sys.path`` through ``conftest.py``) or load by
path. numpy + SimpleITK only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

#: the label tables used by the synthetic datasets
LABELS_2 = {"0": "background", "1": "sphere"}
LABELS_3 = {"0": "background", "1": "sphere", "2": "ellipsoid"}


def labels_for(num_classes: int) -> dict[str, str]:
    if num_classes == 2:
        return dict(LABELS_2)
    if num_classes == 3:
        return dict(LABELS_3)
    raise ValueError("synthetic cases have 2 or 3 classes")


@dataclass
class SyntheticCase:
    """One case: ``image`` float32 and ``label`` uint8 arrays (z, y, x) on ``spacing``/``origin``/``direction``."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


def _ellipsoid(shape_zyx, centre_zyx, radii_zyx) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape_zyx], indexing="ij")
    d = (
        ((zz - centre_zyx[0]) / radii_zyx[0]) ** 2
        + ((yy - centre_zyx[1]) / radii_zyx[1]) ** 2
        + ((xx - centre_zyx[2]) / radii_zyx[2]) ** 2
    )
    return d <= 1.0


def make_case(
    shape_zyx: Sequence[int] = (24, 24, 24),
    *,
    num_classes: int = 2,
    seed: int = 0,
    noise: float = 0.15,
    scale: Optional[float] = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Optional[Sequence[float]] = None,
) -> SyntheticCase:
    """A random case: sphere (label 1) in one half along x, ellipsoid (label 2, if 3 classes) in the other half.

    Radii scale with the volume (about a fifth of the smallest side), so each blob stays inside its half.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape_zyx)
    z, y, x = shape
    base = min(shape) / 5.0
    label = np.zeros(shape, np.uint8)
    # sphere: left half in x (or anywhere with 2 classes)
    r = base * rng.uniform(0.85, 1.15)
    xlo, xhi = (r + 1, x / 2 - 1) if num_classes == 3 else (r + 1, x - r - 2)
    c = (rng.uniform(r + 1, z - r - 2), rng.uniform(r + 1, y - r - 2), rng.uniform(xlo, max(xlo, xhi)))
    label[_ellipsoid(shape, c, (r, r, r))] = 1
    image = np.zeros(shape, np.float32)
    image[label == 1] = 1.0
    if num_classes == 3:
        radii = tuple(base * rng.uniform(0.7, 1.2, size=3))
        rx = radii[2]
        c2 = (
            rng.uniform(radii[0] + 1, z - radii[0] - 2),
            rng.uniform(radii[1] + 1, y - radii[1] - 2),
            rng.uniform(x / 2 + rx + 1, max(x / 2 + rx + 1, x - rx - 2)),
        )
        m = _ellipsoid(shape, c2, radii) & (label == 0)
        label[m] = 2
        image[m] = 0.5
    elif num_classes != 2:
        raise ValueError("synthetic cases have 2 or 3 classes")
    image += rng.normal(0.0, noise, size=shape).astype(np.float32)
    s = float(rng.uniform(1.0, 50.0)) if scale is None else float(scale)
    image *= s
    d = tuple(np.eye(3).ravel()) if direction is None else tuple(float(v) for v in direction)
    return SyntheticCase(image.astype(np.float32), label, tuple(map(float, spacing)), tuple(map(float, origin)), d)


def to_sitk(array_zyx: np.ndarray, case: SyntheticCase):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    img.SetSpacing(case.spacing)
    img.SetOrigin(case.origin)
    img.SetDirection(case.direction)
    return img


def write_case(case: SyntheticCase, image_path: str | Path, label_path: Optional[str | Path] = None) -> None:
    """Write the image (and label) with SimpleITK; the file type follows the name (.nii.gz, .nrrd, .mha)."""
    import SimpleITK as sitk

    Path(image_path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_sitk(case.image, case), str(image_path), useCompression=True)
    if label_path is not None:
        Path(label_path).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(to_sitk(case.label, case), str(label_path), useCompression=True)


def make_dataset(
    root: str | Path,
    n_cases: int = 6,
    *,
    layout: str = "folders",
    num_classes: int = 2,
    shape_zyx: Sequence[int] = (24, 24, 24),
    suffix: str = ".nii.gz",
    seed: int = 0,
    prefix: str = "case",
    noise: float = 0.15,
) -> Path:
    """Write ``n_cases`` synthetic cases under ``root`` and return the dataset path to train from.

    Layouts:
        "folders": ``root/images/<name>`` + ``root/labels/<name>`` (same file names); returns ``root``.
        "msd":     ``root/imagesTr`` + ``root/labelsTr`` + ``root/dataset.json`` (MSD style); returns the json path.
    Case ``i`` uses seed ``seed * 1000 + i`` and is named ``<prefix>_<i:03d><suffix>``.
    """
    root = Path(root)
    img_dir, lab_dir = ("images", "labels") if layout == "folders" else ("imagesTr", "labelsTr")
    entries = []
    for i in range(n_cases):
        name = f"{prefix}_{i:03d}{suffix}"
        case = make_case(shape_zyx, num_classes=num_classes, seed=seed * 1000 + i, noise=noise)
        write_case(case, root / img_dir / name, root / lab_dir / name)
        entries.append({"image": f"./{img_dir}/{name}", "label": f"./{lab_dir}/{name}"})
    if layout == "folders":
        return root
    if layout != "msd":
        raise ValueError(f"unknown layout {layout!r}")
    ds = {
        "name": "synthetic spheres",
        "description": "synthetic test data",
        "licence": "CC0",
        "modality": {"0": "MRI"},
        "labels": labels_for(num_classes),
        "numTraining": n_cases,
        "training": entries,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(ds, indent=2))
    return root / "dataset.json"


def dice(pred: np.ndarray, truth: np.ndarray, label: int = 1) -> float:
    """Dice of one label between two integer label maps."""
    p, t = pred == label, truth == label
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)


#: Settings of the tiny model the ``tiny_bundle`` fixture trains (kept here so tests can rebuild the same data).
TINY_SHAPE_ZYX = (24, 24, 24)
TINY_NUM_CLASSES = 2
