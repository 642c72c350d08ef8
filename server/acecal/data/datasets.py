"""Labelled datasets: discovery (MSD ``dataset.json`` or paired ``images/`` + ``labels/`` folders), validation before
training, and the deterministic train/validation split.

Validation reads every pair once (SimpleITK) and reports every problem it finds, each naming the case and what is
wrong, so a user fixes the whole dataset in one go instead of one crash at a time.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from acecal.data.io import grid_of, has_supported_suffix, read_volume, suffix_of
from acecal.errors import InvalidInputError
from acecal.geometry import Grid

#: folder pairs recognised inside a dataset root, in order of preference
FOLDER_PAIRS = (("images", "labels"), ("imagesTr", "labelsTr"))


class DatasetError(InvalidInputError):
    """The dataset cannot be used. ``problems`` lists one ``"<case>: <problem>"`` string per problem found."""

    code = "invalid_dataset"

    def __init__(self, detail: str, problems: Optional[list[str]] = None):
        super().__init__(detail)
        self.problems = list(problems or [])


@dataclass(frozen=True)
class Case:
    """One image (and its label map, when labelled). ``name`` is the file name without its image suffix."""

    name: str
    image: str
    label: Optional[str] = None

    def as_dict(self) -> dict:
        d = {"image": self.image, "case": self.name}
        if self.label is not None:
            d["label"] = self.label
        return d


@dataclass
class DatasetInfo:
    """What was found: the cases and where they came from (recorded in the bundle's training record)."""

    cases: list[Case]
    source: str
    kind: str  # "msd" | "folders"
    name: str = ""
    licence: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def record(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "name": self.name,
            "licence": self.licence,
            "num_cases": len(self.cases),
        }


def case_name(path: str | Path) -> str:
    n = Path(path).name
    s = suffix_of(n)
    return n[: -len(s)] if s else n


def _files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and has_supported_suffix(p.name)
    )


def discover_folders(
    images: str | Path, labels: Optional[str | Path] = None, *, require_labels: bool = True
) -> DatasetInfo:
    """Cases from an images folder and a labels folder holding the same file names.

    A label may also differ only in its file type (``a.nii.gz`` ↔ ``a.nrrd``). An image without a label is kept with
    ``label=None`` (validation reports it when labels are required); a label without an image is an error.
    """
    images, labels_dir = Path(images), Path(labels) if labels is not None else None
    if not images.is_dir():
        raise DatasetError(f"the images folder {str(images)!r} does not exist")
    if labels_dir is not None and not labels_dir.is_dir():
        raise DatasetError(f"the labels folder {str(labels_dir)!r} does not exist")
    img_files = _files(images)
    lab_by_name: dict[str, Path] = {}
    if labels_dir is not None:
        for p in _files(labels_dir):
            lab_by_name.setdefault(case_name(p), p)
    cases, problems = [], []
    seen = set()
    for p in img_files:
        name = case_name(p)
        if name in seen:
            problems.append(f"{name}: two images with this name but different file types in {images}")
            continue
        seen.add(name)
        lab = lab_by_name.get(name)
        cases.append(Case(name, str(p), str(lab) if lab else None))
    orphans = sorted(set(lab_by_name) - seen)
    for o in orphans:
        problems.append(f"{o}: label {lab_by_name[o].name} has no image with the same name in {images}")
    if problems:
        raise DatasetError("the dataset has problems:\n  " + "\n  ".join(problems), problems)
    if labels_dir is None and require_labels:
        raise DatasetError(f"no labels folder given for {images}")
    return DatasetInfo(cases, str(images), "folders")


def discover_msd(dataset_json: str | Path, *, section: str = "training") -> DatasetInfo:
    """Cases from an MSD-style ``dataset.json`` (its ``training`` list of ``{"image", "label"}``, paths relative to
    the json file's folder)."""
    path = Path(dataset_json)
    if not path.is_file():
        raise DatasetError(f"the dataset file {str(path)!r} does not exist")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path.name} is not valid JSON: {e}") from None
    entries = meta.get(section) if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f"{path.name} has no {section!r} list of {{'image', 'label'}} entries")
    root = path.parent
    cases, problems, seen = [], [], set()
    for i, raw in enumerate(entries):
        entry = {"image": raw} if isinstance(raw, str) else raw
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            problems.append(f"entry {i}: needs an 'image' path")
            continue
        img = (root / entry["image"]).resolve()
        lab = entry.get("label")
        name = case_name(img)
        if name in seen:
            problems.append(f"{name}: listed twice in {path.name}")
            continue
        seen.add(name)
        cases.append(Case(name, str(img), str((root / lab).resolve()) if isinstance(lab, str) else None))
    if problems:
        raise DatasetError(f"{path.name} has problems:\n  " + "\n  ".join(problems), problems)
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    return DatasetInfo(
        cases,
        str(path),
        "msd",
        name=str(meta.get("name", "")),
        licence=str(meta.get("licence", meta.get("license", ""))),
        labels={str(k): str(v) for k, v in labels.items()},
        description=str(meta.get("description", "")),
    )


def discover_dataset(
    data: Optional[str | Path] = None,
    *,
    images: Optional[str | Path] = None,
    labels: Optional[str | Path] = None,
    require_labels: bool = True,
) -> DatasetInfo:
    """Find the cases of a dataset.

    Args:
        data: a ``dataset.json`` file, a folder containing one, or a folder with ``images/`` + ``labels/``
            (or ``imagesTr/`` + ``labelsTr/``) sub-folders.
        images, labels: explicit image and label folders (instead of ``data``).
    """
    if images is not None:
        return discover_folders(images, labels, require_labels=require_labels)
    if data is None:
        raise DatasetError("give a dataset: a dataset.json, a folder with images/ and labels/, or --images/--labels")
    p = Path(data)
    if p.is_file():
        return discover_msd(p)
    if p.is_dir():
        if (p / "dataset.json").is_file():
            return discover_msd(p / "dataset.json")
        for a, b in FOLDER_PAIRS:
            if (p / a).is_dir():
                info = discover_folders(p / a, p / b if (p / b).is_dir() else None, require_labels=require_labels)
                info.source = str(p)
                return info
        raise DatasetError(f"{str(p)!r} has no dataset.json and no images/ + labels/ folders")
    raise DatasetError(f"the dataset {str(p)!r} does not exist")


@dataclass
class CaseSummary:
    name: str
    shape_xyz: tuple[int, int, int]
    spacing: tuple[float, float, float]
    label_values: list[int]


def validate_cases(
    cases: Sequence[Case],
    num_classes: int,
    *,
    in_channels: int = 1,
    require_labels: bool = True,
    max_problems: int = 50,
) -> list[CaseSummary]:
    """Check every case before training; raise :class:`DatasetError` naming each case and problem.

    Checks: the dataset is not empty; each image is a readable 3-D volume with ``in_channels`` components and finite
    voxels; each label exists, is a readable 3-D scalar volume, holds whole numbers in ``0..num_classes-1``, and lies
    on exactly the image's grid (size, spacing, origin, direction).
    """
    if not cases:
        raise DatasetError("the dataset is empty: no image files (.nii.gz, .nii, .nrrd, .mha) were found")
    problems: list[str] = []
    summaries: list[CaseSummary] = []
    for c in cases:
        if len(problems) >= max_problems:
            problems.append(f"... stopped after {max_problems} problems")
            break
        try:
            img = read_volume(c.image, what="image", allow_vector=in_channels > 1)
        except InvalidInputError as e:
            problems.append(f"{c.name}: {e.detail}")
            continue
        ncomp = img.GetNumberOfComponentsPerPixel()
        if ncomp != in_channels:
            problems.append(f"{c.name}: the image has {ncomp} channel(s) but the model takes {in_channels}")
            continue
        if c.label is None:
            if require_labels:
                problems.append(f"{c.name}: missing label (no label file for image {Path(c.image).name})")
            continue
        if not Path(c.label).is_file():
            problems.append(f"{c.name}: missing label (file {Path(c.label).name} not found)")
            continue
        try:
            lab = read_volume(c.label, what="label")
        except InvalidInputError as e:
            problems.append(f"{c.name}: {e.detail}")
            continue
        gi, gl = grid_of(img), grid_of(lab)
        if gi.size != gl.size:
            problems.append(
                f"{c.name}: image and label grids differ: image size {'x'.join(map(str, gi.size))}, "
                f"label size {'x'.join(map(str, gl.size))}"
            )
            continue
        if not gi.same_as(gl, atol=1e-3):
            diffs = [
                k
                for k, a, b in (
                    ("spacing", gi.spacing, gl.spacing),
                    ("origin", gi.origin, gl.origin),
                    ("direction", gi.direction, gl.direction),
                )
                if not np.allclose(a, b, atol=1e-3)
            ]
            problems.append(
                f"{c.name}: image and label grids differ in {', '.join(diffs)} "
                f"(image {_fmt(gi, diffs)}; label {_fmt(gl, diffs)})"
            )
            continue
        arr = sitk.GetArrayViewFromImage(lab)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.equal(np.mod(arr, 1), 0)):
            problems.append(
                f"{c.name}: the label map has non-integer values; it must hold class numbers 0..{num_classes - 1}"
            )
            continue
        values = np.unique(np.asarray(arr)).astype(np.int64)
        unknown = [int(v) for v in values if v < 0 or v >= num_classes]
        if unknown:  # a few examples and the count: a hostile label map must not list its whole content back
            shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
            count = f" ({len(unknown)} values)" if len(unknown) > 5 else ""
            problems.append(
                f"{c.name}: label values [{shown}]{count} are unknown to the model (it knows 0..{num_classes - 1})"
            )
            continue
        summaries.append(CaseSummary(c.name, gi.size, gi.spacing, [int(v) for v in values]))
    if problems:
        head = f"{len(problems)} problem(s) in the dataset; nothing was trained:"
        raise DatasetError(head + "\n  " + "\n  ".join(problems), problems)
    return summaries


def _fmt(grid: Grid, keys: Iterable[str]) -> str:
    return ", ".join(f"{k} {tuple(round(v, 4) for v in getattr(grid, k))}" for k in keys)


def split_cases(
    cases: Sequence[Case],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    val_cases: Optional[Sequence[str]] = None,
    min_val: int = 1,
) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split.

    With ``val_cases`` (case names) those cases are the validation set. Otherwise the cases are sorted by name,
    shuffled with ``random.Random(seed)`` and the first ``max(min_val, round(val_fraction * n))`` go to validation
    (none when ``val_fraction`` is 0). The same names and seed always give the same split, independent of file order.
    """
    by_name = {c.name: c for c in cases}
    if val_cases is not None:
        missing = [n for n in val_cases if n not in by_name]
        if missing:
            raise DatasetError(f"validation cases not in the dataset: {', '.join(missing)}", missing)
        vs = set(val_cases)
        val = [by_name[n] for n in sorted(vs)]
        train = [c for n, c in sorted(by_name.items()) if n not in vs]
    else:
        names = sorted(by_name)
        random.Random(seed).shuffle(names)
        n_val = 0 if val_fraction <= 0 else max(min_val, int(round(val_fraction * len(names))))
        if len(names) > 1:
            n_val = min(n_val, len(names) - 1)
        else:
            n_val = 0
        val = [by_name[n] for n in sorted(names[:n_val])]
        train = [by_name[n] for n in sorted(names[n_val:])]
    if not train:
        raise DatasetError("no training cases left after the validation split")
    return train, val


def cases_to_dicts(cases: Iterable[Case]) -> list[dict]:
    return [c.as_dict() for c in cases]


__all__ = [
    "Case",
    "CaseSummary",
    "DatasetError",
    "DatasetInfo",
    "discover_dataset",
    "discover_folders",
    "discover_msd",
    "validate_cases",
    "split_cases",
    "cases_to_dicts",
    "case_name",
]
