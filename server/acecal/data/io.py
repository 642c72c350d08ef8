"""Image I/O with SimpleITK, and the bridge into MONAI.

- :func:`read_volume` reads and validates a 3-D scalar volume (NIfTI, NRRD, MetaImage) with messages a clinician can
  act on, after :mod:`acecal.data.headers` has checked the file's header (regular file, attached data, voxel budget).
- :class:`SimpleITKReader` is a MONAI ``ImageReader`` so ``LoadImaged(reader=SimpleITKReader())`` gives the same
  arrays and RAS affines in training datasets as :func:`to_metatensor` gives at inference.
- :func:`grid_of` / :func:`write_volume` move between SimpleITK images and :class:`acecal.geometry.Grid`.

Array orders: SimpleITK arrays are (z, y, x); MONAI tensors here are (C, x, y, z) with an RAS affine.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader

from acecal.data.headers import ImageHeader, current_limits, inspect_image, open_regular
from acecal.errors import InvalidInputError
from acecal.geometry import Grid, affine_lps_to_ras
from acecal.protocol import IMAGE_SUFFIXES

#: file name endings the project reads and writes
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES


def has_supported_suffix(name: str | os.PathLike) -> bool:
    n = str(name).lower()
    return any(n.endswith(s) for s in SUPPORTED_SUFFIXES)


def suffix_of(name: str | os.PathLike) -> str:
    n = str(name).lower()
    for s in SUPPORTED_SUFFIXES:
        if n.endswith(s):
            return s
    return ""


def read_volume(
    path: str | os.PathLike, *, what: str = "image", allow_vector: bool = False, name: Optional[str] = None
) -> sitk.Image:
    """Read a 3-D volume and check it is usable.

    The header is checked first (:func:`acecal.data.headers.inspect_image`: a regular file, voxel data attached, within
    the voxel budget of :func:`acecal.data.headers.current_limits`); only then does SimpleITK read it, with the
    ImageIO of the format that was checked. ``name`` is the file name used in messages (default: the path's).

    Raises:
        InvalidInputError: not a regular file, detached data, unreadable or corrupt file, not 3-D, multi-component
            (unless ``allow_vector``), or containing NaN/inf voxels.
        PayloadTooLargeError: more voxels than the budget allows.
    """
    path = Path(path)
    name = name or path.name
    if not has_supported_suffix(path.name):
        raise InvalidInputError(
            f"the {what} file {name!r} has an unsupported type; use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    header = inspect_image(path, name=name, what=what)
    if header.format.startswith("nifti") and not _nifti_data_complete(path, header):
        raise InvalidInputError(
            f"the {what} file {name!r} is truncated or corrupt: it holds fewer voxels than its header announces"
        )
    reader = sitk.ImageFileReader()
    reader.SetImageIO(header.itk_io)
    reader.SetFileName(str(path))
    try:
        img = reader.Execute()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise InvalidInputError(
            f"the {what} file {name!r} could not be read as an image ({scrub_paths(first, path)[:200]}); is it a "
            "complete NIfTI/NRRD/MHA file?"
        ) from None
    read_values = math.prod(img.GetSize()) * img.GetNumberOfComponentsPerPixel()
    if read_values != header.values:
        raise InvalidInputError(
            f"the {what} file {name!r} could not be read consistently: its header announces {header.values:,} voxel "
            f"values but {read_values:,} were read; is it a valid scalar or vector volume?"
        )
    if img.GetDimension() != 3:
        raise InvalidInputError(
            f"the {what} {name!r} is {img.GetDimension()}-D ({'x'.join(map(str, img.GetSize()))}); "
            "a 3-D volume is needed"
        )
    if min(img.GetSize()) < 2:
        raise InvalidInputError(
            f"the {what} {name!r} has size {'x'.join(map(str, img.GetSize()))}: a single slice is not a 3-D volume"
        )
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp != 1 and not allow_vector:
        raise InvalidInputError(
            f"the {what} {name!r} has {ncomp} components per voxel; a single-channel (scalar) volume is needed"
        )
    arr = sitk.GetArrayViewFromImage(img)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InvalidInputError(f"the {what} {name!r} contains {bad} NaN or infinite voxels; fix or mask them first")
    return img


def scrub_paths(text: str, *paths: str | os.PathLike) -> str:
    """``text`` with each of ``paths`` (and their folders) replaced by the bare file name: messages never carry a
    server path."""
    for p in paths:
        p = Path(p)
        for variant in (str(p), str(p.resolve()) if p.is_absolute() else None):
            if variant:
                text = text.replace(variant, p.name)
        for folder in (str(p.parent), str(p.parent.resolve())):
            if folder not in ("", ".", "/"):
                text = text.replace(folder + os.sep, "").replace(folder, "")
    return text


def _nifti_data_complete(path: Path, header: ImageHeader) -> bool:
    """False when a NIfTI file (or its gzip stream) ends before the voxel data its header announces.

    ITK reads such files with a warning and zeros for the missing voxels; a clinician would never notice. Checked
    before ITK reads: a gzip stream is inflated in chunks, discarded as it goes, and only up to the announced size:
    whatever follows (a gzip bomb) is never inflated.
    """
    need = int(header.data_offset or 0) + header.nbytes
    try:
        with open_regular(path, follow_symlinks=current_limits().follow_symlinks) as f:
            if not header.compressed:
                return os.fstat(f.fileno()).st_size >= need
            d = zlib.decompressobj(wbits=31)
            total, pending = 0, b""
            while total < need:
                chunk = pending or f.read(1 << 20)
                if not chunk or d.eof:
                    break
                total += len(d.decompress(chunk, min(1 << 22, need - total)))  # never past the announced size
                pending = d.unconsumed_tail
            return total >= need
    except (EOFError, OSError, zlib.error, InvalidInputError):
        return False


def grid_of(img: sitk.Image) -> Grid:
    return Grid(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def apply_grid(img: sitk.Image, grid: Grid) -> sitk.Image:
    if tuple(img.GetSize()) != grid.size:
        raise ValueError(f"image size {img.GetSize()} does not match grid size {grid.size}")
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return img


def image_from_array(array_zyx: np.ndarray, grid: Grid) -> sitk.Image:
    """A SimpleITK image from a (z, y, x) array on ``grid``."""
    arr = np.ascontiguousarray(array_zyx)
    if arr.shape != grid.shape_zyx:
        raise ValueError(f"array shape {arr.shape} (z, y, x) does not match the grid's {grid.shape_zyx}")
    return apply_grid(sitk.GetImageFromArray(arr), grid)


def write_volume(array_zyx: np.ndarray, grid: Grid, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write a (z, y, x) array on ``grid`` to ``path`` (type from the file ending)."""
    path = Path(path)
    sitk.WriteImage(image_from_array(array_zyx, grid), str(path), useCompression=compress)
    return path


def ras_affine(img: sitk.Image) -> np.ndarray:
    """MONAI's affine of a SimpleITK image: index (i, j, k) -> RAS millimetres."""
    return affine_lps_to_ras(grid_of(img).ijk_to_lps)


def to_metatensor(img: sitk.Image, dtype: Any = None) -> MetaTensor:
    """A MONAI ``MetaTensor`` of shape (1, x, y, z) with the image's RAS affine, as ``LoadImage`` + channel-first
    give."""
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    t = torch.as_tensor(np.ascontiguousarray(arr)[None], dtype=dtype or torch.float32)
    affine = torch.as_tensor(ras_affine(img), dtype=torch.float64)
    return MetaTensor(
        t,
        affine=affine,
        meta={
            "original_affine": affine.clone(),
            "spatial_shape": np.array(arr.shape),
            "space": "RAS",
            "original_channel_dim": 0,
        },
    )


def _names(x: Any) -> list[str | os.PathLike[str]]:
    """One file name or MONAI's list of them (several files: the channels of one image)."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` backed by SimpleITK (NIfTI, NRRD, MetaImage), RAS affines like MONAI's own readers.

    Use as ``LoadImaged(keys, reader=SimpleITKReader())``. Each array is returned (x, y, z) without a channel axis
    (``original_channel_dim`` = "no_channel"), so follow it with ``EnsureChannelFirstd``.
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> bool:
        return all(has_supported_suffix(n) for n in _names(filename))

    def read(
        self, data: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], **kwargs: Any
    ) -> sitk.Image | list[sitk.Image]:
        imgs = [read_volume(n) for n in _names(data)]
        return imgs if len(imgs) > 1 else imgs[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        imgs = img if isinstance(img, (list, tuple)) else [img]
        arrays, meta = [], {}
        for im in imgs:
            arrays.append(sitk.GetArrayFromImage(im).transpose(2, 1, 0))
            affine = ras_affine(im)
            meta = {
                "affine": affine,
                "original_affine": affine.copy(),
                "spatial_shape": np.asarray(arrays[-1].shape),
                "space": "RAS",
                "original_channel_dim": float("nan"),
                "spacing": np.asarray(im.GetSpacing()),
            }
        data = np.stack(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        if len(arrays) > 1:
            meta["original_channel_dim"] = 0
        return data, meta
