"""The numpy NRRD codec against SimpleITK, both ways, with oblique directions, and the NRRD variants it must read."""

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from acecal.data.io import grid_of
from acecal.geometry import Grid
from acecal.nrrd import NrrdError, decode_nrrd, encode_nrrd, read_nrrd, write_nrrd

ROT = np.array([[0.0, 0.8, 0.6], [0.0, -0.6, 0.8], [1.0, 0.0, 0.0]])  # orthonormal, axes permuted, tilted
GRID = Grid((5, 6, 7), (0.7, 1.3, 2.1), (10.5, -3.25, 7.0), tuple(ROT.ravel()))
DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64]


def _array(dtype, shape=GRID.shape_zyx, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.normal(0, 100, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)


def _sitk_image(arr, grid):
    img = sitk.GetImageFromArray(arr, isVector=arr.ndim == 4)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return img


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_simpleitk_reads_what_we_write(tmp_path, dtype, encoding):
    arr = _array(dtype)
    p = write_nrrd(tmp_path / "a.nrrd", arr, GRID, encoding=encoding)
    img = sitk.ReadImage(str(p))
    assert grid_of(img).same_as(GRID, atol=1e-12)
    out = sitk.GetArrayFromImage(img)
    assert out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compress", [False, True])
def test_we_read_what_simpleitk_writes(tmp_path, dtype, compress):
    arr = _array(dtype, seed=1)
    sitk.WriteImage(_sitk_image(arr, GRID), str(tmp_path / "s.nrrd"), useCompression=compress)
    vol = read_nrrd(tmp_path / "s.nrrd")
    assert vol.grid.same_as(GRID, atol=1e-12)
    assert vol.array.dtype == arr.dtype
    np.testing.assert_array_equal(vol.array, arr)


def test_vector_images_both_ways(tmp_path):
    arr = _array(np.float32, GRID.shape_zyx + (3,))
    sitk.WriteImage(_sitk_image(arr, GRID), str(tmp_path / "v.nrrd"))
    vol = read_nrrd(tmp_path / "v.nrrd")
    assert vol.components == 3 and vol.grid.same_as(GRID)
    np.testing.assert_array_equal(vol.array, arr)
    write_nrrd(tmp_path / "w.nrrd", arr, GRID)
    img = sitk.ReadImage(str(tmp_path / "w.nrrd"))
    assert img.GetNumberOfComponentsPerPixel() == 3 and grid_of(img).same_as(GRID)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)


def test_bytes_round_trip_and_bool_masks():
    mask = _array(np.uint8) > 500
    vol = decode_nrrd(encode_nrrd(mask, GRID, encoding="gzip"))
    assert vol.array.dtype == np.uint8 and vol.grid.same_as(GRID)
    np.testing.assert_array_equal(vol.array, mask.astype(np.uint8))


def _header(**fields):
    base = {
        "type": "short",
        "dimension": "3",
        "sizes": "3 2 2",
        "encoding": "raw",
        "endian": "little",
        "space": "left-posterior-superior",
        "space directions": "(2,0,0) (0,3,0) (0,0,4)",
        "space origin": "(1,2,3)",
    }
    base.update(fields)
    return "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in base.items() if v is not None) + "\n"


def test_ras_space_is_converted_to_lps():
    data = np.arange(12, dtype="<i2")
    raw = (
        _header(space="right-anterior-superior", **{"space directions": "(-2,0,0) (0,3,0) (0,0,4)"}).encode()
        + data.tobytes()
    )
    vol = decode_nrrd(raw)
    np.testing.assert_allclose(vol.grid.origin, (-1, -2, 3))
    np.testing.assert_allclose(vol.grid.direction_matrix, np.diag([1.0, -1.0, 1.0]))
    np.testing.assert_allclose(vol.grid.spacing, (2, 3, 4))
    np.testing.assert_array_equal(vol.array.ravel(), data)


def test_big_endian_ascii_hex_and_bzip2_encodings():
    data = np.arange(12, dtype=np.int16)
    vol = decode_nrrd(_header(endian="big").encode() + data.astype(">i2").tobytes())
    np.testing.assert_array_equal(vol.array.ravel(), data)
    vol = decode_nrrd(_header(encoding="ascii").encode() + " ".join(map(str, data)).encode())
    np.testing.assert_array_equal(vol.array.ravel(), data)
    vol = decode_nrrd(_header(encoding="hex").encode() + data.astype("<i2").tobytes().hex().encode())
    np.testing.assert_array_equal(vol.array.ravel(), data)
    import bz2

    vol = decode_nrrd(_header(encoding="bzip2").encode() + bz2.compress(data.astype("<i2").tobytes()))
    np.testing.assert_array_equal(vol.array.ravel(), data)


def test_detached_header_is_refused_not_followed(tmp_path):
    """A header naming another file is never followed (Testing/client/test_hostile_nrrd.py has the attacks)."""
    data = np.arange(12, dtype="<i2")
    (tmp_path / "d.raw.gz").write_bytes(gzip.compress(data.tobytes()))
    (tmp_path / "d.nhdr").write_text(_header(encoding="gzip", **{"data file": "d.raw.gz"}))
    with pytest.raises(NrrdError, match="detached"):
        read_nrrd(tmp_path / "d.nhdr")


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"hello", "magic"),
        (_header().encode() + b"\x00\x01", "truncated"),
        (_header(type="block").encode(), "unsupported NRRD type"),
        (
            _header(dimension="2", sizes="3 2", **{"space directions": "(1,0) (0,1)"}).encode() + bytes(12),
            "spatial axes",
        ),
        (_header(encoding="gzip").encode() + b"not gzip", "corrupt"),
        (_header(space="upside-down-sideways").encode() + bytes(24), "space"),
        (_header(sizes=None).encode(), "sizes"),
    ],
)
def test_malformed_files_raise_nrrd_error(blob, message):
    with pytest.raises(NrrdError, match=message):
        decode_nrrd(blob)


def test_write_checks_shape_against_grid():
    with pytest.raises(ValueError, match="does not match"):
        encode_nrrd(np.zeros((2, 2, 2), np.float32), GRID)


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_arrays_are_writable_and_raw_buffers_are_used_in_place(tmp_path, encoding):
    arr = _array(np.float32)
    blob = encode_nrrd(arr, GRID, encoding=encoding)
    for source in (blob, bytearray(blob), write_nrrd(tmp_path / "a.nrrd", arr, GRID, encoding=encoding)):
        vol = read_nrrd(source)
        assert vol.array.flags.writeable
        vol.array[0, 0, 0] = 1.0
    buf = bytearray(blob)
    vol = decode_nrrd(buf)
    if encoding == "raw":  # zero-copy: the array shares the buffer
        assert np.shares_memory(vol.array, np.frombuffer(buf, np.uint8))
