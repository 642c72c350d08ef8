"""The header parser that runs before any image reader (acecal.data.headers) and read_volume built on it.

Real files written by SimpleITK for the formats, hand-built hostile headers for the attacks (Testing/hostile.py).
"""

from __future__ import annotations

import os
import struct
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hostile import (
    fifo,
    mha_pointer,
    nifti_gz_bomb,
    nifti_header,
    nrrd_gzip_bomb,
    nrrd_header,
    nrrd_pointer,
    secret_file,
)

from acecal.data.headers import (
    MIN_DEFAULT_VOXELS,
    ImageLimits,
    check_model_space_budget,
    current_limits,
    default_limits,
    image_limits,
    inspect_image,
    memory_voxel_budget,
    model_space_voxels,
    read_header,
)
from acecal.data.io import read_volume
from acecal.errors import InvalidInputError, PayloadTooLargeError


def _write(tmp_path, name, array, spacing=(0.5, 0.75, 2.0), compress=False):
    img = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(tmp_path / name), useCompression=compress)
    return tmp_path / name


@pytest.mark.parametrize(
    "name, compress, fmt",
    [
        ("a.nii", False, "nifti1"),
        ("a.nii.gz", True, "nifti1"),
        ("a.nrrd", False, "nrrd"),
        ("g.nrrd", True, "nrrd"),
        ("a.mha", False, "metaimage"),
        ("c.mha", True, "metaimage"),
    ],
)
def test_headers_of_real_files(tmp_path, name, compress, fmt):
    path = _write(tmp_path, name, np.zeros((5, 6, 7), np.int16), compress=compress)
    h = read_header(path)
    assert (h.format, h.size, h.components, h.pixel_type, h.attached) == (fmt, (7, 6, 5), 1, "int16", True)
    np.testing.assert_allclose(h.spacing, (0.5, 0.75, 2.0), rtol=1e-6)
    assert h.values == 7 * 6 * 5 and h.nbytes == 2 * 7 * 6 * 5
    assert read_volume(path).GetSize() == (7, 6, 5)


@pytest.mark.parametrize("name", ["v.nrrd", "v.mha", "v.nii.gz"])
def test_vector_images_count_their_components(tmp_path, name):
    path = _write(tmp_path, name, np.zeros((4, 5, 6, 3), np.float32), compress=name.endswith(".gz"))
    h = read_header(path)
    assert h.size == (6, 5, 4) and h.components == 3 and h.values == 360


def test_nifti2_header(tmp_path):
    nib.save(nib.Nifti2Image(np.zeros((6, 5, 4), np.float32), np.diag([1.5, 1.5, 3.0, 1.0])), tmp_path / "n2.nii")
    h = read_header(tmp_path / "n2.nii")
    assert (h.format, h.size, h.pixel_type) == ("nifti2", (6, 5, 4), "float32")
    np.testing.assert_allclose(h.spacing, (1.5, 1.5, 3.0))


# --- detached voxel data: refused before anything else is opened ----------------------------------------------------
def _detached_files(tmp_path):
    secret, _ = secret_file(tmp_path)
    rel = os.path.relpath(secret, tmp_path / "up")
    yield "mha absolute", "x.mha", mha_pointer(str(secret))
    yield "mha relative", "x.mha", mha_pointer(rel)
    yield "mha lower-case key", "x.mha", mha_pointer(str(secret), key="elementdatafile")
    yield "mha list", "x.mha", mha_pointer("LIST")
    yield "nrrd data file", "x.nrrd", nrrd_pointer(str(secret))
    yield "nrrd datafile relative", "x.nrrd", nrrd_pointer(rel, key="datafile")
    yield "nrrd upper-case key", "x.nrrd", nrrd_pointer(str(secret), key="Data File")
    yield "nrrd /dev/zero", "x.nrrd", nrrd_pointer("/dev/zero", sizes=(1024, 1024, 1024))
    yield "nhdr", "x.nhdr", nrrd_pointer(str(secret))
    yield "mhd", "x.mhd", mha_pointer(str(secret))
    yield "nifti hdr/img pair", "x.nii", nifti_header((16, 16, 16), magic=b"ni1\x00")


def test_detached_data_is_refused_without_opening_the_target(tmp_path):
    (tmp_path / "up").mkdir()
    for what, name, blob in _detached_files(tmp_path):
        path = tmp_path / "up" / name
        path.write_bytes(blob)
        assert read_header(path).attached is False, what
        with pytest.raises(InvalidInputError) as e:
            read_volume(path, what="label")
        assert "does not hold its voxel data" in e.value.detail, (what, e.value.detail)
        assert "ACECAL-SECRET" not in e.value.detail and str(tmp_path) not in e.value.detail, what
        path.unlink()


def test_a_fifo_is_refused_at_once_and_never_blocks(tmp_path):
    pipe = fifo(tmp_path, "scan.nrrd")
    (tmp_path / "p.mha").write_bytes(mha_pointer(str(pipe)))
    outcome = {}

    def read():
        for p in (pipe, tmp_path / "p.mha"):
            try:
                read_volume(p)
            except InvalidInputError as e:
                outcome[p.name] = e.detail

    t = threading.Thread(target=read, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert time.monotonic() - t0 < 5
    assert "FIFO" in outcome["scan.nrrd"] and "does not hold its voxel data" in outcome["p.mha"]


def test_folders_and_missing_files(tmp_path):
    (tmp_path / "d.nii").mkdir()
    with pytest.raises(InvalidInputError, match="folder"):
        read_header(tmp_path / "d.nii")
    with pytest.raises(InvalidInputError, match="empty or missing"):
        read_header(tmp_path / "none.nii")


def test_symlinks_are_followed_only_where_allowed(tmp_path):
    target = _write(tmp_path, "t.nrrd", np.zeros((3, 3, 3), np.uint8))
    (tmp_path / "link.nrrd").symlink_to(target)
    assert read_header(tmp_path / "link.nrrd").size == (3, 3, 3)  # the CLI: a dataset of links is fine
    with image_limits(ImageLimits(10**9, 10**9, follow_symlinks=False, server=True)):
        with pytest.raises(InvalidInputError, match="symbolic link"):
            read_volume(tmp_path / "link.nrrd")


def _with_vox_offset(offset: float) -> bytes:
    block = bytearray(nifti_header((4, 4, 4)))
    block[108:112] = struct.pack("<f", offset)
    return bytes(block) + bytes(256)


@pytest.mark.parametrize(
    "name, blob, message",
    [
        ("a.nii", _with_vox_offset(1e12), "vox_offset of 1e\\+12 bytes"),
        ("a.nii", _with_vox_offset(4096.0), "truncated"),
        ("a.nii", nifti_gz_bomb((4, 4, 4), 256), "rename it to .nii.gz"),
        ("a.nrrd", mha_pointer("LOCAL"), "rename it to .mha"),
        ("a.nii", nifti_header((4, 4, 4))[:100], "too short"),
        ("a.nrrd", b"NRRD0004\ntype: short\n" + b"x" * 70000, "no end to its NRRD header"),
        ("a.nrrd", b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 -4\n\n", "sizes"),
        ("a.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n", "no ElementDataFile"),
        ("a.mha", mha_pointer("LOCAL", element_type="MET_STRING"), "unsupported MetaImage ElementType"),
        (
            "a.mha",
            mha_pointer("LOCAL").replace(
                b"DimSize", b"CompressedData = True\nCompressedDataSize = " + str(100 << 30).encode() + b"\nDimSize"
            )
            + b"x" * 100,
            "announces 107,374,182,400 bytes of compressed data but holds",
        ),
        ("a.nii.gz", b"\x1f\x8b" + b"garbage" * 20, "gzip data are corrupt"),
        ("a.nii", b"hello, I am not a volume", "not a recognised image type"),
    ],
)
def test_malformed_headers_get_clear_messages(tmp_path, name, blob, message):
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(InvalidInputError, match=message):
        read_volume(tmp_path / name)


# --- budgets ---------------------------------------------------------------------------------------------------------
def test_a_real_ct_passes_the_default_budgets_from_its_header_alone(tmp_path):
    """512 x 512 x 1000 int16 at 0.7 x 0.7 x 1.0 mm: checked from a header-only file (nothing allocated)."""
    (tmp_path / "ct.nrrd").write_bytes(nrrd_header((512, 512, 1000), "short"))
    header = read_header(tmp_path / "ct.nrrd")
    assert header.values == 512 * 512 * 1000 and header.attached
    limits = default_limits()
    assert limits.max_voxels >= MIN_DEFAULT_VOXELS >= header.values
    assert memory_voxel_budget() >= MIN_DEFAULT_VOXELS
    inspect_image(tmp_path / "ct.nrrd", limits=limits)  # no 413 (the data are missing, but they are never read)
    n = check_model_space_budget((512, 512, 1000), (0.7, 0.7, 1.0), (1.0, 1.0, 1.0), name="ct", limits=limits)
    assert n == pytest.approx(358.4 * 358.4 * 1000, rel=1e-6)


def test_over_budget_images_are_413_from_the_header_with_the_setting_named(tmp_path):
    (tmp_path / "big.nii.gz").write_bytes(nifti_gz_bomb((256, 256, 256), 0))  # 1 KB announcing 64 MB
    with image_limits(ImageLimits(1_000_000, 10**9, server=True)):
        with pytest.raises(PayloadTooLargeError) as e:
            read_volume(tmp_path / "big.nii.gz")
    assert "16,777,216 voxel values" in e.value.detail and "1,000,000" in e.value.detail
    assert "ACECAL_MAX_VOXELS" in e.value.detail and "--max-voxels" in e.value.detail
    assert current_limits() == default_limits()  # the context is undone


def test_budgets_from_the_environment(monkeypatch):
    monkeypatch.setenv("ACECAL_MAX_VOXELS", "12345")
    monkeypatch.setenv("ACECAL_MAX_MODEL_VOXELS", "6e6")
    assert default_limits().max_voxels == 12345 and default_limits().max_model_voxels == 6_000_000
    monkeypatch.setenv("ACECAL_MAX_VOXELS", "lots")
    with pytest.raises(ValueError, match="ACECAL_MAX_VOXELS"):
        default_limits()


def test_model_space_size_is_arithmetic_and_refused_before_resampling():
    assert model_space_voxels((4, 4, 4), (50.0, 50.0, 50.0), (1.0, 1.0, 1.0)) == 8_000_000
    assert model_space_voxels((100, 100, 10), (1.0, 1.0, 5.0), (1.0, 1.0, 1.0)) == 500_000
    assert model_space_voxels((4, 4, 4), (1e300, 1e300, 1e300), (1.0, 1.0, 1.0)) == 2**62  # no overflow
    limits = ImageLimits(10**9, 1_000_000)
    with pytest.raises(PayloadTooLargeError, match="max_model_voxels") as e:
        check_model_space_budget((4, 4, 4), (50.0, 50.0, 50.0), (1.0, 1.0, 1.0), name="tiny.nii", limits=limits)
    assert "8,000,000" in e.value.detail and "50" in e.value.detail


# --- bounded inflation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, bomb",
    [
        ("b.nii.gz", lambda need, after: nifti_gz_bomb((16, 16, 16), 0, corrupt_after=after)),
        ("b.nrrd", lambda need, after: nrrd_gzip_bomb((16, 16, 16), 0, corrupt_after=after)),
    ],
)
def test_compressed_data_are_inflated_only_as_far_as_announced(tmp_path, name, bomb):
    """The stream turns invalid 1 MB past the announced 16^3 float32: a reader inflating further would fail."""
    need = 16**3 * 4
    (tmp_path / name).write_bytes(bomb(need, need + (1 << 20)))
    assert read_volume(tmp_path / name).GetSize() == (16, 16, 16)
