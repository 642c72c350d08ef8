"""A small, numpy-only NRRD reader and writer: 3-D volumes (optionally with one component axis) and their LPS grid.

The client and the Slicer module use it to send arrays and read returned volumes without SimpleITK or torch. It
reads what SimpleITK/ITK, 3D Slicer and pynrrd write (``raw``, ``gzip``, ``bzip2``, ``ascii`` and ``hex`` encodings,
either endianness, ``space`` given as LPS, RAS, LAS or any other anatomical triple) and writes files that SimpleITK
and Slicer read back with the same geometry.

A file is read as it is, nothing else: a detached header (``data file:``, ``.nhdr``) is refused rather than followed
to the file it names, anything but a regular file (a FIFO, a device) is refused without blocking, and compressed data
are inflated only as far as the header's sizes announce (a gzip bomb stops there).

Geometry comes and goes as an :class:`acecal.geometry.Grid` in **LPS**, the convention of every image file:
``space directions`` column n = ``direction[:, n] * spacing[n]``, ``space origin`` = the centre of voxel (0, 0, 0).
A file written in another space (say ``right-anterior-superior``) is converted to LPS on reading.

Array order: numpy arrays are (z, y, x) — the NRRD's fastest axis (x) last — or (z, y, x, c) when the file has a
non-spatial component axis (NRRD's first, fastest axis: ``kinds: vector domain domain domain``).
"""

from __future__ import annotations

import bz2
import io
import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

import numpy as np

from acecal.geometry import Grid

__all__ = ["NrrdError", "NrrdVolume", "read_nrrd", "decode_nrrd", "write_nrrd", "encode_nrrd", "nrrd_header"]

PathOrBytes = Union[str, os.PathLike[str], bytes, bytearray, memoryview]

#: NRRD axis kinds that are not spatial axes (a volume has exactly 3 spatial ones)
NONSPATIAL_KINDS = frozenset(
    {
        "vector",
        "covariant-vector",
        "normal",
        "list",
        "point",
        "2-vector",
        "3-vector",
        "4-vector",
        "3-color",
        "rgb-color",
        "hsv-color",
        "xyz-color",
        "4-color",
        "rgba-color",
        "2d-symmetric-matrix",
        "3d-symmetric-matrix",
        "2d-matrix",
        "3d-matrix",
        "complex",
        "quaternion",
        "scalar",
    }
)


class NrrdError(ValueError):
    """The data is not an NRRD this reader understands (the message says what is wrong)."""


_TYPES: dict[str, str] = {}
for _names, _np in (
    (("signed char", "int8", "int8_t"), "i1"),
    (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    (("int", "signed int", "int32", "int32_t"), "i4"),
    (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"), "i8"),
    (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    (("float",), "f4"),
    (("double",), "f8"),
):
    for _n in _names:
        _TYPES[_n] = _np
#: NRRD type name -> numpy type code (``"i2"``...), shared with the server's header check
NRRD_TYPES = _TYPES

_WRITE_TYPES = {
    "i1": "int8",
    "u1": "uint8",
    "i2": "short",
    "u2": "ushort",
    "i4": "int",
    "u4": "uint",
    "i8": "longlong",
    "u8": "ulonglong",
    "f4": "float",
    "f8": "double",
}

# sign of each physical axis of a named space relative to LPS
_SPACE_WORDS = {
    "left": (0, 1.0),
    "right": (0, -1.0),
    "posterior": (1, 1.0),
    "anterior": (1, -1.0),
    "superior": (2, 1.0),
    "inferior": (2, -1.0),
}
_SPACE_ABBREV = {"l": "left", "r": "right", "p": "posterior", "a": "anterior", "s": "superior", "i": "inferior"}


@dataclass
class NrrdVolume:
    """A decoded NRRD: the array ((z, y, x) or (z, y, x, c)), its LPS grid and the raw header fields."""

    array: np.ndarray
    grid: Grid
    header: dict[str, str] = field(default_factory=dict)

    @property
    def components(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[-1])


# ------------------------------------------------------------------------------------------------ reading
def _space_signs(space: str) -> np.ndarray:
    """Per-axis sign that turns coordinates in the named space into LPS."""
    s = space.strip().lower()
    if s in ("scanner-xyz", "3d-right-handed", "3d-left-handed", ""):
        return np.ones(3)  # no anatomical meaning: taken as LPS, as ITK does
    s = s[:-1] if len(s) == 4 and s.endswith("t") else s  # RAST/LPST: time axis not supported, but the name is
    words = s.split("-")
    if len(words) == 1 and len(s) == 3 and all(c in _SPACE_ABBREV for c in s):
        words = [_SPACE_ABBREV[c] for c in s]
    if len(words) == 4 and words[-1] == "time":
        words = words[:3]
    if len(words) != 3 or any(w not in _SPACE_WORDS for w in words):
        raise NrrdError(f"unsupported NRRD space {space!r}")
    signs = np.zeros(3)
    for w in words:
        axis, sign = _SPACE_WORDS[w]
        if signs[axis] != 0:
            raise NrrdError(f"NRRD space {space!r} names an axis twice")
        signs[axis] = sign
    # the triple must name the axes in x, y, z order (left/right first...), as every real file does
    order = [_SPACE_WORDS[w][0] for w in words]
    if order != [0, 1, 2]:
        raise NrrdError(
            f"unsupported NRRD space {space!r}: axes are not in left-right, posterior-anterior, inferior-superior order"
        )
    return signs


_VEC = re.compile(r"\(([^)]*)\)")


def _parse_vector(text: str) -> np.ndarray:
    m = _VEC.fullmatch(text.strip())
    if not m:
        raise NrrdError(f"malformed NRRD vector {text!r}")
    try:
        return np.array([float(v) for v in m.group(1).split(",")], dtype=np.float64)
    except ValueError:
        raise NrrdError(f"malformed NRRD vector {text!r}") from None


def _parse_directions(text: str) -> list[Optional[np.ndarray]]:
    out: list[Optional[np.ndarray]] = []
    for tok in re.findall(r"\([^)]*\)|none", text):
        out.append(None if tok == "none" else _parse_vector(tok))
    return out


def _split_header(data: bytes) -> tuple[list[str], int]:
    """Header lines (without the magic) and the offset where the attached data starts."""
    if not data.startswith(b"NRRD000"):
        raise NrrdError("not an NRRD file (no NRRD000x magic line)")
    # The header ends at the first empty line ("\n\n" or "\r\n\r\n").
    m = re.search(rb"\r?\n\r?\n", data[: 1 << 20])
    if m is None:
        # a detached header (.nhdr) may end without a blank line
        if data.count(b"\n") and len(data) < (1 << 20):
            text, end = data, len(data)
        else:
            raise NrrdError("the NRRD header has no end (a blank line must separate it from the data)")
    else:
        text, end = data[: m.start()], m.end()
    lines = text.decode("latin-1").splitlines()
    return lines[1:], end


def _parse_header(lines: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if ":=" in line:  # key/value pairs (comments for us)
            k, v = line.split(":=", 1)
            fields[f"kv:{k}"] = v
            continue
        if ": " not in line:
            raise NrrdError(f"malformed NRRD header line {line!r}")
        k, v = line.split(": ", 1)
        fields[k.strip().lower()] = v.strip()
    return fields


def _decode_payload(payload: bytes, encoding: str, dtype: np.dtype, count: int) -> np.ndarray:
    enc = encoding.lower()
    need = count * dtype.itemsize
    if enc in ("raw",):
        raw = payload
    elif enc in ("gzip", "gz"):
        try:  # wbits 47: gzip or zlib container; never more than the announced bytes are inflated
            raw = zlib.decompressobj(47).decompress(payload, need)
        except zlib.error as e:
            raise NrrdError(f"the gzip-compressed NRRD data is corrupt: {e}") from None
    elif enc in ("bzip2", "bz2"):
        try:
            raw = bz2.BZ2Decompressor().decompress(payload, need)
        except (OSError, ValueError, EOFError) as e:
            raise NrrdError(f"the bzip2-compressed NRRD data is corrupt: {e}") from None
    elif enc in ("ascii", "text", "txt"):
        try:
            arr = np.array(bytes(payload).decode("latin-1").split(), dtype=np.float64)
        except ValueError:
            raise NrrdError("the ascii NRRD data holds something that is not a number") from None
        if arr.size < count:
            raise NrrdError(f"the NRRD data is truncated: {arr.size} values for {count} voxels")
        return arr[:count].astype(dtype.newbyteorder("="))
    elif enc == "hex":
        try:
            raw = bytes.fromhex(bytes(payload).decode("latin-1"))
        except ValueError:
            raise NrrdError("the hex NRRD data is corrupt") from None
    else:
        raise NrrdError(f"unsupported NRRD encoding {encoding!r}")
    if len(raw) < need:
        raise NrrdError(f"the NRRD data is truncated: {len(raw)} bytes for {need} expected")
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _volume_from_fields(fields: dict[str, str], payload: Union[bytes, memoryview]) -> NrrdVolume:
    try:
        ntype = fields["type"].lower()
        dim = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
    except KeyError as e:
        raise NrrdError(f"the NRRD header lacks the required field {e.args[0]!r}") from None
    except ValueError:
        raise NrrdError("the NRRD header has a malformed dimension or sizes field") from None
    if ntype not in _TYPES:
        raise NrrdError(f"unsupported NRRD type {fields['type']!r}")
    if len(sizes) != dim or any(s < 1 for s in sizes):
        raise NrrdError(f"NRRD sizes {sizes} do not match dimension {dim}")
    endian = fields.get("endian", "little").lower()
    if endian not in ("little", "big"):
        raise NrrdError(f"unsupported NRRD endian {endian!r}")
    dtype = np.dtype(("<" if endian == "little" else ">") + _TYPES[ntype])
    encoding = fields.get("encoding", "raw")
    count = int(np.prod(sizes))

    # which axes are spatial
    if "space directions" in fields:
        dirs = _parse_directions(fields["space directions"])
        if len(dirs) != dim:
            raise NrrdError(f"NRRD space directions give {len(dirs)} axes for dimension {dim}")
        spatial = [i for i, d in enumerate(dirs) if d is not None]
    else:
        dirs = None
        kinds = fields.get("kinds", "").split()
        spatial = [i for i in range(dim) if not (i < len(kinds) and kinds[i].lower() in NONSPATIAL_KINDS)]
    if len(spatial) != 3:
        raise NrrdError(f"the NRRD has {len(spatial)} spatial axes; a 3-D volume is needed")
    comp_axes = [i for i in range(dim) if i not in spatial]
    if len(comp_axes) > 1 or (comp_axes and comp_axes != [0]):
        raise NrrdError("only a single non-spatial axis, stored first (fastest), is supported")

    signs = _space_signs(fields.get("space", "left-posterior-superior"))
    if dirs is not None:
        axes = np.stack([d for d in dirs if d is not None], axis=1)  # columns: the spatial axes in the file's space
        if axes.shape != (3, 3):
            raise NrrdError("NRRD space directions must be 3-vectors")
        axes = axes * signs[:, None]
    else:
        sp = fields.get("spacings", "").split()
        spacing = [float(sp[i]) if i < len(sp) and sp[i].lower() != "nan" else 1.0 for i in spatial]
        axes = np.diag(spacing)
    if "space origin" in fields:
        origin = _parse_vector(fields["space origin"])
        if origin.shape != (3,):
            raise NrrdError("NRRD space origin must be a 3-vector")
        origin = origin * signs
    else:
        origin = np.zeros(3)
    spatial_sizes = [sizes[i] for i in spatial]
    try:
        grid = Grid.from_ijk_to_lps(
            spatial_sizes, np.block([[axes, origin[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])
        )
    except ValueError as e:
        raise NrrdError(f"the NRRD geometry is unusable: {e}") from None

    arr = _decode_payload(payload, encoding, dtype, count)
    # NRRD axis 0 is the fastest: reversed sizes give numpy's C order
    arr = arr.reshape(sizes[::-1])  # (z, y, x) or, with a component axis, (z, y, x, c)
    if not arr.flags.writeable:  # read-only source (bytes, decompressed data): arrays are always writable
        arr = arr.copy()
    return NrrdVolume(np.ascontiguousarray(arr), grid, {k: v for k, v in fields.items()})


def decode_nrrd(data: Union[bytes, bytearray, memoryview]) -> NrrdVolume:
    """Decode an NRRD with attached data held in memory.

    Raw data in a writable buffer (``bytearray``, ``BytesIO.getbuffer()``) are used in place, without a copy: the
    array then shares that memory. Data in ``bytes`` (read-only) are copied once, so arrays are always writable.
    """
    mv = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    lines, start = _split_header(bytes(mv[: 1 << 20]))
    fields = _parse_header(lines)
    if "data file" in fields or "datafile" in fields:
        raise NrrdError(
            "a detached NRRD header (its 'data file' field names another file) is refused; only NRRD files "
            "with attached data are read"
        )
    return _volume_from_fields(fields, _skip(mv[start:], fields))


def _skip(payload: Union[bytes, memoryview], fields: dict[str, str]) -> Union[bytes, memoryview]:
    try:
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    except ValueError:
        raise NrrdError("the NRRD header has a malformed line skip or byte skip") from None
    if line_skip < 0 or byte_skip < -1:
        raise NrrdError("the NRRD header has a negative line skip or byte skip")
    if line_skip:
        text = bytes(payload)
        for _ in range(line_skip):
            nl = text.find(b"\n")
            if nl < 0:  # no more lines: the data are truncated (found out when decoding)
                text = b""
                break
            text = text[nl + 1 :]
        payload = text
    if byte_skip == -1:  # data sit at the end of the file (raw only)
        if fields.get("encoding", "raw").lower() != "raw":
            raise NrrdError("byte skip -1 is only valid with raw encoding")
        sizes = [int(s) for s in fields["sizes"].split()]
        need = int(np.prod(sizes)) * np.dtype(_TYPES.get(fields["type"].lower(), "u1")).itemsize
        return payload[len(payload) - need :] if len(payload) >= need else payload
    return payload[byte_skip:]


def _open_regular(path: Path) -> io.BufferedReader:
    """Open ``path`` if it is a regular file; never blocks on a FIFO (``O_NONBLOCK``), checks ``fstat`` first."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(str(path), flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NrrdError(f"{path.name!r} is not a regular file (a FIFO, device or folder); only NRRD files are read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_nrrd(source: PathOrBytes) -> NrrdVolume:
    """Read an NRRD with attached data from a path (``.nrrd``) or from bytes.

    Raises:
        NrrdError: not an NRRD, a detached header (``data file``: the data are never looked for elsewhere), or a path
            that is not a regular file.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_nrrd(source)
    path = Path(source)
    if path.name.lower().endswith(".nhdr"):
        raise NrrdError(f"{path.name!r} is a detached NRRD header (.nhdr); only NRRD files with attached data are read")
    with _open_regular(path) as fh:  # into a writable buffer: raw arrays use it in place
        data = bytearray(os.fstat(fh.fileno()).st_size)
        fh.readinto(data)
    lines, start = _split_header(bytes(data[: 1 << 20]))
    fields = _parse_header(lines)
    if "data file" in fields or "datafile" in fields:
        raise NrrdError(
            f"{path.name!r} is a detached NRRD header (its 'data file' field names another file); only "
            "NRRD files with attached data are read"
        )
    return _volume_from_fields(fields, _skip(memoryview(data)[start:], fields))


# ------------------------------------------------------------------------------------------------ writing
def _fmt(v: float) -> str:
    return repr(float(v)) if np.isfinite(v) else "nan"


def nrrd_header(
    array: np.ndarray, grid: Grid, *, encoding: str = "raw", extra: Optional[dict[str, str]] = None
) -> bytes:
    """The NRRD header (ending with the blank line) for ``array`` ((z, y, x) or (z, y, x, c)) on ``grid``."""
    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected a (z, y, x) or (z, y, x, c) array, got shape {arr.shape}")
    if tuple(arr.shape[:3]) != grid.shape_zyx:
        raise ValueError(f"array shape {arr.shape[:3]} (z, y, x) does not match the grid's {grid.shape_zyx}")
    key = arr.dtype.newbyteorder("<").str[1:]
    if arr.dtype == np.bool_:
        key = "u1"
    if key not in _WRITE_TYPES:
        raise ValueError(f"cannot write dtype {arr.dtype} to NRRD")
    if encoding not in ("raw", "gzip"):
        raise ValueError("encoding must be 'raw' or 'gzip'")
    axes = grid.direction_matrix * np.asarray(grid.spacing)[None, :]  # columns = spacing-scaled axis vectors
    dirs = " ".join("(" + ",".join(_fmt(c) for c in axes[:, n]) + ")" for n in range(3))
    sizes = " ".join(str(s) for s in grid.size)
    kinds = "domain domain domain"
    dim = 3
    if arr.ndim == 4:
        dim, sizes, dirs, kinds = 4, f"{arr.shape[3]} {sizes}", "none " + dirs, "vector " + kinds
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_WRITE_TYPES[key]}",
        f"dimension: {dim}",
        "space: left-posterior-superior",
        f"sizes: {sizes}",
        f"space directions: {dirs}",
        f"kinds: {kinds}",
        "endian: little",
        f"encoding: {encoding}",
        "space origin: (" + ",".join(_fmt(c) for c in grid.origin) + ")",
    ]
    for k, v in (extra or {}).items():
        if "\n" in k or "\n" in str(v) or ":=" in k:
            raise ValueError("key/value pairs must be single-line")
        lines.append(f"{k}:={v}")
    return ("\n".join(lines) + "\n\n").encode("latin-1")


def _payload_chunks(arr: np.ndarray, chunk: int = 1 << 24) -> Iterator[memoryview]:
    flat = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).reshape(-1).view(np.uint8)
    for i in range(0, flat.size, chunk):
        yield flat[i : i + chunk].data  # the bytes of a contiguous slice, no copy


def _write_to(
    fh: BinaryIO, array: np.ndarray, grid: Grid, encoding: str, level: int, extra: Optional[dict[str, str]]
) -> None:
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    fh.write(nrrd_header(arr, grid, encoding=encoding, extra=extra))
    if encoding == "raw":
        for c in _payload_chunks(arr):
            fh.write(c)
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip container
        for c in _payload_chunks(arr):
            fh.write(comp.compress(c))
        fh.write(comp.flush())


def encode_nrrd(
    array: np.ndarray, grid: Grid, *, encoding: str = "raw", level: int = 1, extra: Optional[dict[str, str]] = None
) -> bytes:
    """The bytes of an NRRD file holding ``array`` ((z, y, x) or (z, y, x, c)) on ``grid``."""
    buf = io.BytesIO()
    _write_to(buf, array, grid, encoding, level, extra)
    return buf.getvalue()


def write_nrrd(
    path: Union[str, os.PathLike[str]],
    array: np.ndarray,
    grid: Grid,
    *,
    encoding: str = "raw",
    level: int = 1,
    extra: Optional[dict[str, str]] = None,
) -> Path:
    """Write ``array`` ((z, y, x) or (z, y, x, c)) on ``grid`` to ``path`` as an NRRD with attached data.

    Args:
        encoding: ``raw`` (fastest) or ``gzip`` (``level`` 1-9; 1 is fast and already shrinks masks a lot).
        extra: ``key:=value`` pairs to store in the header.
    """
    path = Path(path)
    with open(path, "wb") as fh:
        _write_to(fh, array, grid, encoding, level, extra)
    return path
