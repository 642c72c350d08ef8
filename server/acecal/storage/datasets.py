"""Stored datasets: labelled cases uploaded once, validated on arrival, kept under the data directory.

Layout (every file name chosen by the server; the user's file name is kept in the database for display only)::

    <data_dir>/datasets/<dataset_id>/images/<case_id>.nii.gz
    <data_dir>/datasets/<dataset_id>/labels/<case_id>.nii.gz

A case is read once, after its headers were checked (:mod:`acecal.data.headers`: regular files, voxel data attached,
within the voxel budget), and **re-encoded** as NIfTI from the images read (:func:`reencode_pair`): the stored files
are what was validated, never the uploaded bytes (whose header could name another file for a later reader to
follow). The stored pair is then checked (:func:`check_pair`): both files readable, 3-D, scalar (or the declared
model's channel count), finite; the label map whole numbers on exactly the image's grid (size, spacing, origin,
direction); and its values among the labels of the dataset's model (declared at ``POST /datasets`` or given with the
upload as ``model``), otherwise in 0..255 and checked against the base model when a job is submitted
(:func:`unknown_labels`). With a model, the image must also fit the model-space voxel budget at that model's spacing.
A refused case is a 422 (413 for the budgets) naming the file and the problem, never a server path.

Durability: the files are moved into place with ``fsync`` (:func:`acecal.storage.files.durable_move`) before the
row is committed, and the reply is sent after the commit. A crash in between leaves an orphan file that
:meth:`DatasetStore.reconcile` removes at the next start; a deleted dataset's row goes first, then its folder.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from acecal.bundles import Bundle, ModelRegistry
from acecal.data.headers import check_model_space_budget
from acecal.errors import ACECalError, ConflictError, InvalidInputError, NotFoundError
from acecal.storage.db import CaseRow, Database, DatasetRow, new_id, now_iso
from acecal.storage.files import durable_move, fsync_path, storage_error

__all__ = [
    "DATASETS_DIR",
    "MAX_LABEL_VALUES",
    "STORED_SUFFIX",
    "DatasetStore",
    "case_not_found",
    "check_pair",
    "clean_name",
    "clean_text",
    "dataset_not_found",
    "few",
    "reencode_pair",
    "unknown_labels",
]

log = logging.getLogger("acecal.storage")

DATASETS_DIR = "datasets"
#: label values accepted when no model is declared (class numbers of a uint8 label map)
MAX_LABEL_VALUES = 256
#: the ending of every stored image and label
STORED_SUFFIX = ".nii.gz"
_ID = re.compile(r"^[a-z0-9_]{1,40}$")


def dataset_not_found(ds_id: str) -> NotFoundError:
    return NotFoundError(
        f"unknown dataset {ds_id!r}; list them with GET /datasets (or `acecal datasets`)", code="dataset_not_found"
    )


def case_not_found(ds_id: str, case_id: str) -> NotFoundError:
    return NotFoundError(f"dataset {ds_id!r} has no case {case_id!r}", code="case_not_found")


def clean_text(text: Optional[str], limit: int = 100) -> str:
    """Printable, one line (no NUL, CR/LF, bidi overrides or other control/format characters: each becomes ``?``),
    surrounding spaces stripped, at most ``limit`` characters."""
    return "".join(ch if ch.isprintable() else "?" for ch in (text or "")).strip()[:limit]


def clean_name(name: Optional[str], fallback: str) -> str:
    """A display name: printable, one line, at most 100 characters, without folders or the image suffix."""
    from acecal.data.io import suffix_of  # SimpleITK boundary: acecal.data.io loads SimpleITK and MONAI

    base = re.split(r"[\\/]", name or "")[-1]
    s = suffix_of(base)
    if s:
        base = base[: -len(s)]
    return clean_text(base) or fallback


def few(values: Iterable[Any], n: int = 5) -> str:
    """A count and the first few values, for messages: ``[3, 4, 5, 6, 7, ...] (250 values)``."""
    values = list(values)
    shown = ", ".join(str(v) for v in values[:n]) + (", ..." if len(values) > n else "")
    return f"[{shown}]" + (f" ({len(values)} values)" if len(values) > n else "")


# --- case checks -----------------------------------------------------------------------------------------------------
def check_pair(
    image: Path,
    label: Path,
    *,
    image_name: str,
    label_name: str,
    num_classes: int,
    in_channels: int = 1,
    model_note: str = "",
) -> dict[str, Any]:
    """Validate one uploaded (image, label) pair; returns ``{"size", "spacing", "label_values"}``.

    Raises :class:`InvalidInputError` (422) naming the user's files and every problem found.
    """
    # SimpleITK boundary: the readers load SimpleITK and MONAI, needed only once a case arrives
    from acecal.data.datasets import Case, DatasetError, validate_cases
    from acecal.data.io import scrub_paths

    try:
        summary = validate_cases([Case("case", str(image), str(label))], num_classes, in_channels=in_channels)[0]
    except DatasetError as e:
        problems = []
        for p in e.problems or [e.detail]:
            p = p[len("case: ") :] if p.startswith("case: ") else p
            p = scrub_paths(p, image, label)
            p = p.replace(image.name, image_name).replace(label.name, label_name)
            if "unknown to the model" in p:
                if model_note:
                    p += f" {model_note}"
                else:  # no model to check against: only class numbers of a label map
                    p = re.sub(
                        r"are unknown to the model \(it knows 0\.\.\d+\)",
                        f"are not class numbers 0..{num_classes - 1}",
                        p,
                    )
            problems.append(p)
        raise InvalidInputError(
            f"case refused ({image_name} + {label_name}): " + "; ".join(problems), code="invalid_case"
        ) from None
    return {
        "size": list(summary.shape_xyz),
        "spacing": [round(float(s), 6) for s in summary.spacing],
        "label_values": list(summary.label_values),
    }


def reencode_pair(
    image: Path, label: Path, *, image_name: str, label_name: str, in_channels: int = 1
) -> tuple[Path, Path]:
    """Read an uploaded pair (headers checked first) and write it again as NIfTI next to the uploads; returns the new
    files. The stored case is then exactly what was read, whatever the uploaded files' headers said.

    Raises :class:`InvalidInputError` (422) or :class:`~acecal.errors.PayloadTooLargeError` (413) naming the
    user's file.
    """
    import SimpleITK as sitk  # SimpleITK boundary: reading and writing images

    from acecal.data.io import read_volume

    out: list[Path] = []
    try:
        for path, what, shown, vector in (
            (image, "image", image_name, in_channels > 1),
            (label, "label", label_name, False),
        ):
            try:
                vol = read_volume(path, what=what, allow_vector=vector, name=shown)
            except ACECalError as e:
                e.detail = f"case refused ({image_name} + {label_name}): {e.detail}"
                if isinstance(e, InvalidInputError):
                    e.code = "invalid_case"
                raise
            target = path.with_name(path.name.split(".")[0] + f"-{what}{STORED_SUFFIX}")
            out.append(target)
            try:
                sitk.WriteImage(vol, str(target), useCompression=True)
            except RuntimeError:  # ITK says only "could not write": tell a full disk from a bad geometry
                need = 2 * path.stat().st_size + (1 << 20)
                if shutil.disk_usage(target.parent).free < need:
                    raise storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "the uploaded case") from None
                raise InvalidInputError(
                    f"case refused ({image_name} + {label_name}): the {what} could not be "
                    "stored as NIfTI; is its geometry valid?",
                    code="invalid_case",
                ) from None
            del vol
    except BaseException:
        for p in out:
            p.unlink(missing_ok=True)
        raise
    return out[0], out[1]


def unknown_labels(cases: Iterable[CaseRow], bundle: Bundle) -> Optional[InvalidInputError]:
    """A 422 naming each case whose label values ``bundle`` does not know (from the values recorded at upload)."""
    n = bundle.config.num_classes
    wrong = [
        f"{c.name} ({c.id}): {few(v for v in c.info.get('label_values', []) if v >= n)}"
        for c in cases
        if any(v >= n for v in c.info.get("label_values", []))
    ]
    if not wrong:
        return None
    known = ", ".join(f"{k}={v}" for k, v in bundle.config.labels.items())
    return InvalidInputError(
        f"label values unknown to model {bundle.id!r} (it knows 0..{n - 1}: {known}) in "
        f"{len(wrong)} case(s): " + "; ".join(wrong[:10]) + ("; ..." if len(wrong) > 10 else ""),
        code="invalid_dataset",
    )


def case_view(c: CaseRow) -> dict[str, Any]:
    """A case as the API describes it (``CaseInfo``)."""
    return {
        "case_id": c.id,
        "name": c.name,
        "size": c.info.get("size"),
        "spacing": c.info.get("spacing"),
        "label_values": c.info.get("label_values", []),
        "bytes": c.info.get("bytes"),
        "created": c.created,
    }


# --- the store -------------------------------------------------------------------------------------------------------
class DatasetStore:
    """Datasets and cases: rows in the :class:`~acecal.storage.db.Database`, files under ``<data_dir>/datasets``."""

    def __init__(self, data_dir: Path, db: Database, registry: ModelRegistry):
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / DATASETS_DIR
        self.db = db
        self.registry = registry

    # --- helpers -------------------------------------------------------------------------------------------------
    def rel(self, p: Path) -> str:
        return str(Path(p).relative_to(self.data_dir))

    def abs(self, rel: str) -> Path:
        return self.data_dir / rel

    def folder(self, ds_id: str) -> Path:
        return self.root / ds_id

    def get(self, ds_id: str) -> DatasetRow:
        """The dataset's row; 404 ``dataset_not_found`` when there is none."""
        row = self.db.get_dataset(ds_id) if isinstance(ds_id, str) and _ID.match(ds_id) else None
        if row is None:
            raise dataset_not_found(ds_id)
        return row

    def cases(self, ds_id: str) -> list[CaseRow]:
        """The dataset's cases in upload order (404 for an unknown dataset)."""
        return self.db.list_cases(self.get(ds_id).id)

    def get_case(self, ds_id: str, case_id: str) -> CaseRow:
        self.get(ds_id)
        c = self.db.get_case(ds_id, case_id)
        if c is None:
            raise case_not_found(ds_id, case_id)
        return c

    def _model(self, model_id: Optional[str]) -> Optional[Bundle]:
        return self.registry.get(model_id) if model_id else None

    # --- datasets ------------------------------------------------------------------------------------------------
    def create(self, name: str, model: Optional[str] = None) -> DatasetRow:
        if model:
            self.registry.get(model)  # 404 model_not_found for an unknown model
        ds_id = new_id("ds")
        d = self.folder(ds_id)
        try:
            for sub in ("images", "labels"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            fsync_path(self.root)
        except OSError as e:
            shutil.rmtree(d, ignore_errors=True)
            raise storage_error(e, "the dataset folder") from None
        return self.db.add_dataset(ds_id, name, model)

    def all(self) -> list[DatasetRow]:
        """Every dataset, oldest first, with its number of cases."""
        return self.db.list_datasets()

    def describe(self, ds_id: str) -> dict[str, Any]:
        """The dataset with its cases, as the API describes it (``DatasetInfo``)."""
        row = self.get(ds_id)
        cases = self.db.list_cases(ds_id)
        return {**row.to_json(), "num_cases": len(cases), "cases": [case_view(c) for c in cases]}

    def _refuse_if_in_use(self, ds_id: str, what: str) -> None:
        active = self.db.active_jobs_using(ds_id)
        if active:
            ids = ", ".join(j.id for j in active)
            raise ConflictError(
                f"cannot delete {what}: fine-tuning job(s) {ids} use dataset {ds_id!r}; wait for them "
                "or cancel them (DELETE /jobs/{id}) first",
                code="dataset_in_use",
            )

    def delete(self, ds_id: str) -> None:
        self.get(ds_id)
        self._refuse_if_in_use(ds_id, f"dataset {ds_id!r}")
        self.db.delete_dataset(ds_id)  # the row first: a crash now leaves a folder the next start removes
        self._remove_folder(self.folder(ds_id))

    def _remove_folder(self, d: Path) -> None:
        if not d.exists():
            return
        trash = d.with_name(f".trash-{d.name}-{uuid.uuid4().hex[:6]}")
        try:
            os.rename(d, trash)
        except OSError:
            trash = d
        shutil.rmtree(trash, ignore_errors=True)

    # --- cases ---------------------------------------------------------------------------------------------------
    def add_case(
        self,
        ds_id: str,
        image_tmp: Path,
        label_tmp: Path,
        *,
        image_name: str,
        label_name: str,
        name: Optional[str] = None,
        model: Optional[str] = None,
    ) -> dict[str, Any]:
        """Validate an uploaded pair (temporary files, deleted here) and store it, re-encoded, as a new case; returns
        its :func:`case_view`.

        Reads run under the caller's :func:`acecal.data.headers.image_limits` (the server's budgets).
        """
        stored: list[Path] = []
        try:
            ds = self.get(ds_id)
            bundle = self._model(model or ds.model)
            if bundle is not None:
                num_classes, in_ch = bundle.config.num_classes, bundle.config.in_channels
                labels = ", ".join(f"{k}={v}" for k, v in bundle.config.labels.items())
                note = f"(model {bundle.id!r} has labels {labels})"
            else:
                num_classes, in_ch, note = MAX_LABEL_VALUES, 1, ""
            case_id = new_id("c")
            img_enc, lab_enc = reencode_pair(
                image_tmp, label_tmp, image_name=image_name, label_name=label_name, in_channels=in_ch
            )
            stored += [img_enc, lab_enc]
            info = check_pair(
                img_enc,
                lab_enc,
                image_name=image_name,
                label_name=label_name,
                num_classes=num_classes,
                in_channels=in_ch,
                model_note=note,
            )
            if bundle is not None:
                check_model_space_budget(
                    info["size"],
                    info["spacing"],
                    bundle.config.spacing,
                    name=image_name,
                    model_id=f"model {bundle.id!r}",
                )
            info["bytes"] = img_enc.stat().st_size + lab_enc.stat().st_size
            d = self.folder(ds_id)
            img = d / "images" / f"{case_id}{STORED_SUFFIX}"
            lab = d / "labels" / f"{case_id}{STORED_SUFFIX}"
            try:
                for sub in ("images", "labels"):
                    (d / sub).mkdir(parents=True, exist_ok=True)
                durable_move(img_enc, img)
                durable_move(lab_enc, lab)
            except OSError as e:
                img.unlink(missing_ok=True)
                lab.unlink(missing_ok=True)
                raise storage_error(e, "the uploaded case") from None
            row = CaseRow(
                id=case_id,
                dataset_id=ds_id,
                name=clean_name(name or image_name, case_id),
                image=self.rel(img),
                label=self.rel(lab),
                info=info,
                created=now_iso(),
            )
            try:
                case = self.db.add_case(row)
            except sqlite3.IntegrityError:  # the dataset was deleted meanwhile
                img.unlink(missing_ok=True)
                lab.unlink(missing_ok=True)
                raise dataset_not_found(ds_id) from None
            except BaseException:
                img.unlink(missing_ok=True)
                lab.unlink(missing_ok=True)
                raise
            return case_view(case)
        finally:
            for p in (image_tmp, label_tmp, *stored):
                p.unlink(missing_ok=True)

    def delete_case(self, ds_id: str, case_id: str) -> None:
        c = self.get_case(ds_id, case_id)
        self._refuse_if_in_use(ds_id, f"case {case_id!r}")
        self.db.delete_case(ds_id, case_id)
        for rel in (c.image, c.label):
            self.abs(rel).unlink(missing_ok=True)

    def case_files(self, ds_id: str, case_ids: Optional[list[str]] = None) -> list[tuple[str, Path, Path]]:
        """(case id, image path, label path) of the dataset's cases (or of ``case_ids``, in that order)."""
        rows = {c.id: c for c in self.db.list_cases(ds_id)}
        ids = list(rows) if case_ids is None else case_ids
        missing = [i for i in ids if i not in rows]
        if missing:
            raise InvalidInputError(f"dataset {ds_id!r} no longer has case(s) {', '.join(missing)}")
        return [(i, self.abs(rows[i].image), self.abs(rows[i].label)) for i in ids]

    # --- start-up ------------------------------------------------------------------------------------------------
    def reconcile(self) -> int:
        """Remove what a crash left behind: folders of deleted datasets, files of uncommitted uploads. Run at start
        by the server that owns the data directory (nothing is being written then)."""
        if not self.root.is_dir():
            return 0
        known = {r.id for r in self.db.list_datasets()}
        files = self.db.all_case_files()
        removed = 0
        for d in list(self.root.iterdir()):
            if not d.is_dir():
                continue
            if d.name.startswith(".trash-") or d.name not in known:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
                continue
            for sub in ("images", "labels"):
                for f in list((d / sub).iterdir()) if (d / sub).is_dir() else []:
                    if self.rel(f) not in files:
                        f.unlink(missing_ok=True)
                        removed += 1
        if removed:
            log.info("removed %d leftover dataset file(s)/folder(s) of interrupted uploads or deletions", removed)
        return removed
