"""Image headers, read before any image reader runs: the format, size, components, pixel type, spacing, and whether
the voxel data are attached to the file.

stdlib + numpy only (no SimpleITK): every path that opens a user-supplied image calls :func:`inspect_image` first, so
a file is refused (with a message a user can act on) before ITK follows a pointer in it, blocks on it or allocates
the voxels its header announces:

- **not a regular file** (a FIFO, a device, a folder; with ``follow_symlinks=False`` also a symbolic link): opened
  with ``O_NONBLOCK`` (a FIFO never blocks) and checked with ``fstat`` before a byte is read -> 422;
- **detached data**: a MetaImage whose ``ElementDataFile`` is not ``LOCAL``, an NRRD with a ``data file`` field, a
  ``.nhdr``/``.mhd`` header, a NIfTI ``.hdr``/``.img`` pair -> 422 (ITK would read whatever file the header names);
- **over budget**: more voxel values than :attr:`ImageLimits.max_voxels` -> 413 naming the limit and the setting.

Formats: NIfTI-1 and NIfTI-2 (``.nii``; ``.nii.gz`` inflated only as far as the 540-byte header), NRRD (the text
header up to the blank line) and MetaImage (``.mha``: the text header up to ``ElementDataFile``). Headers are read
from at most :data:`HEADER_LIMIT` bytes of the file.

Budgets (:class:`ImageLimits`) come from the server's settings (``ACECAL_MAX_VOXELS``, ``ACECAL_MAX_MODEL_VOXELS``)
through :func:`image_limits`, a context the server sets around each request's file work; elsewhere (the CLI, local
training) from the same environment variables or, by default, from the machine's memory
(:func:`memory_voxel_budget`), never below a 512 x 512 x 1024 CT.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
import struct
import zlib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence, Union

from acecal.errors import InvalidInputError, PayloadTooLargeError
from acecal.nrrd import NONSPATIAL_KINDS, NRRD_TYPES

#: bytes of a file read to find its header (NRRD and MetaImage text headers end well before this)
HEADER_LIMIT = 64 * 1024
#: the largest NIfTI vox_offset accepted (the header plus its extensions)
MAX_NIFTI_OFFSET = 16 * 1024 * 1024
#: inference's peak memory per input voxel, measured on the shipped 3-class SegResNets (input, model-space copy,
#: probabilities on both grids, the four output volumes, region maps): about 60-140 bytes; the budget uses 64
BYTES_PER_VOXEL = 64
#: the default budget never refuses less than a 512 x 512 x 1024 CT, whatever the machine
MIN_DEFAULT_VOXELS = 512 * 512 * 1024

MAX_VOXELS_ENV = "ACECAL_MAX_VOXELS"
MAX_MODEL_VOXELS_ENV = "ACECAL_MAX_MODEL_VOXELS"

#: file endings and the format each must hold; the detached ones are refused whatever they hold
SUFFIX_FORMATS = {".nii.gz": "nifti-gz", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "metaimage"}
DETACHED_SUFFIXES = (".nhdr", ".mhd", ".hdr", ".img", ".img.gz", ".hdr.gz")


# ------------------------------------------------------------------------------------------------ budgets
def memory_voxel_budget(bytes_per_voxel: int = BYTES_PER_VOXEL) -> int:
    """Voxels this machine's memory holds at inference's peak use per voxel, at least :data:`MIN_DEFAULT_VOXELS`."""
    total = 0
    try:
        import psutil  # a server extra: a client-only install has no psutil

        total = int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil is optional here (client installs)
        with contextlib.suppress(ValueError, OSError, AttributeError):
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(MIN_DEFAULT_VOXELS, total // max(int(bytes_per_voxel), 1))


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of voxels") from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1")
    return value


def default_max_voxels() -> int:
    """``ACECAL_MAX_VOXELS`` when set, else :func:`memory_voxel_budget`."""
    return _env_int(MAX_VOXELS_ENV) or memory_voxel_budget()


def default_max_model_voxels() -> int:
    """``ACECAL_MAX_MODEL_VOXELS`` when set, else :func:`memory_voxel_budget`."""
    return _env_int(MAX_MODEL_VOXELS_ENV) or memory_voxel_budget()


@dataclass(frozen=True)
class ImageLimits:
    """What a reader accepts.

    Attributes:
        max_voxels: voxel values (voxels x components) of an input image, checked from its header.
        max_model_voxels: voxels of the image once resampled to a model's spacing, checked before resampling.
        follow_symlinks: open a file reached through a symbolic link (the CLI, local datasets); the server, whose
            files all have names it chose, refuses them.
        server: the limits are a server's settings (messages then name the ``acecal serve`` flags too).
    """

    max_voxels: int
    max_model_voxels: int
    follow_symlinks: bool = True
    server: bool = False

    def how_to_raise(self, setting: str) -> str:
        env = {"max_voxels": MAX_VOXELS_ENV, "max_model_voxels": MAX_MODEL_VOXELS_ENV}[setting]
        flag = f" or acecal serve --{setting.replace('_', '-')}" if self.server else ""
        return f"setting {setting}: {env}{flag}"


_LIMITS: ContextVar[Optional[ImageLimits]] = ContextVar("acecal_image_limits", default=None)


def default_limits() -> ImageLimits:
    return ImageLimits(default_max_voxels(), default_max_model_voxels())


def current_limits() -> ImageLimits:
    """The limits set by the innermost :func:`image_limits` of this thread/task, else :func:`default_limits`."""
    return _LIMITS.get() or default_limits()


@contextlib.contextmanager
def image_limits(limits: ImageLimits) -> Iterator[ImageLimits]:
    """Read images under ``limits`` inside the block (every reader calls :func:`current_limits`)."""
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


# ------------------------------------------------------------------------------------------------ the header
@dataclass(frozen=True)
class ImageHeader:
    """What a header announces. ``size`` is the spatial size (i, j, k) (fewer entries for 1-D/2-D images)."""

    format: str  # "nifti1", "nifti2", "nrrd", "metaimage"
    size: tuple[int, ...]
    components: int  # values per voxel (vector axis, RGB, NIfTI dimensions past the third)
    pixel_type: str  # e.g. "int16", "float32"
    itemsize: int  # bytes per value
    spacing: tuple[float, ...]
    attached: bool  # the voxel data sit in this file
    compressed: bool
    why_detached: str = ""
    data_offset: Optional[int] = None  # NIfTI: where the voxels start (vox_offset)

    @property
    def voxels(self) -> int:
        return math.prod(self.size)

    @property
    def values(self) -> int:
        return self.voxels * self.components

    @property
    def nbytes(self) -> int:
        return self.values * self.itemsize

    @property
    def itk_io(self) -> str:
        """The SimpleITK ImageIO that reads this format (forced, so ITK reads the file the way it was checked)."""
        return {"nifti1": "NiftiImageIO", "nifti2": "NiftiImageIO", "nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}[
            self.format
        ]


def _dims(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size)


def _refuse(what: str, name: str, problem: str) -> InvalidInputError:
    return InvalidInputError(f"the {what} file {name!r} {problem}")


def open_regular(
    path: Union[str, os.PathLike], *, name: Optional[str] = None, what: str = "image", follow_symlinks: bool = True
) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file; never blocks (``O_NONBLOCK``), checks ``fstat`` first.

    Raises:
        InvalidInputError: missing, a FIFO/socket/device/folder, or (``follow_symlinks=False``) a symbolic link.
    """
    name = name or Path(path).name
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(os.fspath(path), flags)
    except FileNotFoundError:
        raise _refuse(what, name, "is empty or missing; send a NIfTI, NRRD or MHA volume") from None
    except OSError as e:
        if e.errno == getattr(__import__("errno"), "ELOOP", -1):
            raise _refuse(what, name, "is a symbolic link; send the file itself") from None
        raise _refuse(
            what, name, f"cannot be opened ({os.strerror(e.errno) if e.errno else type(e).__name__})"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a folder"
                if stat.S_ISDIR(st.st_mode)
                else "a FIFO (named pipe)"
                if stat.S_ISFIFO(st.st_mode)
                else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket"
                if stat.S_ISSOCK(st.st_mode)
                else "not a regular file"
            )
            raise _refuse(what, name, f"is {kind}, not a regular file; only image files are read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _suffix(name: str) -> str:
    n = name.lower()
    for s in (*SUFFIX_FORMATS, *DETACHED_SUFFIXES):
        if n.endswith(s):
            return s
    return ""


# --- NIfTI ------------------------------------------------------------------------------------------------------------
#: NIfTI datatype code -> (name, bytes per value, values per voxel)
_NIFTI_TYPES = {
    2: ("uint8", 1, 1),
    4: ("int16", 2, 1),
    8: ("int32", 4, 1),
    16: ("float32", 4, 1),
    32: ("complex64", 8, 1),
    64: ("float64", 8, 1),
    128: ("rgb24", 1, 3),
    256: ("int8", 1, 1),
    512: ("uint16", 2, 1),
    768: ("uint32", 4, 1),
    1024: ("int64", 8, 1),
    1280: ("uint64", 8, 1),
    1536: ("float128", 16, 1),
    1792: ("complex128", 16, 1),
    2048: ("complex256", 32, 1),
    2304: ("rgba32", 1, 4),
}


def _nifti(hdr: bytes, what: str, name: str, compressed: bool) -> ImageHeader:
    if len(hdr) < 348:
        raise _refuse(what, name, "is too short to hold a NIfTI header (is it truncated?)")
    for e in ("<", ">"):
        sizeof_hdr = struct.unpack(e + "i", hdr[:4])[0]
        if sizeof_hdr in (348, 540):
            break
    else:
        raise _refuse(what, name, "is not a NIfTI file (its header size field is neither 348 nor 540)")
    if sizeof_hdr == 348:
        fmt, magic = "nifti1", hdr[344:348]
        dims = struct.unpack(e + "8h", hdr[40:56])
        datatype = struct.unpack(e + "h", hdr[70:72])[0]
        pixdim = struct.unpack(e + "8f", hdr[76:108])
        offset = struct.unpack(e + "f", hdr[108:112])[0]
        if magic == b"ni1\x00":
            return ImageHeader(
                fmt, (), 1, "", 1, (), False, compressed, "it is a NIfTI .hdr whose voxels are in a separate .img file"
            )
        if magic != b"n+1\x00":
            return ImageHeader(
                fmt,
                (),
                1,
                "",
                1,
                (),
                False,
                compressed,
                "it is an Analyze/NIfTI header without the 'n+1' magic (voxels in a separate .img)",
            )
    else:
        if len(hdr) < 540:
            raise _refuse(what, name, "is too short to hold a NIfTI-2 header (is it truncated?)")
        fmt, magic = "nifti2", hdr[4:8]
        datatype = struct.unpack(e + "h", hdr[12:14])[0]
        dims = struct.unpack(e + "8q", hdr[16:80])
        pixdim = struct.unpack(e + "8d", hdr[104:168])
        offset = struct.unpack(e + "q", hdr[168:176])[0]
        if magic == b"ni2\x00":
            return ImageHeader(
                fmt,
                (),
                1,
                "",
                1,
                (),
                False,
                compressed,
                "it is a NIfTI-2 .hdr whose voxels are in a separate .img file",
            )
        if magic != b"n+2\x00":
            raise _refuse(what, name, "is not a NIfTI-2 file (no 'n+2' magic)")
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise _refuse(what, name, f"has a NIfTI header with {ndim} dimensions (1 to 7 are valid); is it corrupt?")
    shape = [int(d) for d in dims[1 : 1 + ndim]]
    if any(d < 1 for d in shape):
        raise _refuse(what, name, f"has a NIfTI header announcing size {_dims(shape)}; every size must be at least 1")
    if datatype not in _NIFTI_TYPES:
        raise _refuse(what, name, f"has an unknown NIfTI datatype code {datatype}")
    tname, itemsize, per_voxel = _NIFTI_TYPES[datatype]
    spatial = tuple(shape[:3])
    extra = math.prod(shape[3:]) if ndim > 3 else 1
    spacing = tuple(abs(float(p)) for p in pixdim[1 : 1 + len(spatial)])
    if not (math.isfinite(offset) and 0 <= offset <= MAX_NIFTI_OFFSET):
        raise _refuse(
            what,
            name,
            f"has a NIfTI vox_offset of {offset:.6g} bytes; header extensions of at most "
            f"{MAX_NIFTI_OFFSET >> 20} MB are read",
        )
    return ImageHeader(
        fmt,
        spatial,
        per_voxel * extra,
        tname,
        itemsize,
        spacing,
        True,
        compressed,
        data_offset=max(int(offset), 352 if fmt == "nifti1" else 544),
    )


def _inflate_head(fh: BinaryIO, first: bytes, n: int) -> bytes:
    """The first ``n`` bytes of the gzip stream that starts with ``first`` and goes on in ``fh``: inflates no more."""
    d = zlib.decompressobj(wbits=31)
    out = bytearray()
    data = first
    try:
        while len(out) < n and data:
            out += d.decompress(data, n - len(out))  # returns short only once all input is used
            if d.eof:
                break
            data = fh.read(16384)
    except zlib.error:
        pass  # a corrupt stream: the short header is refused by the caller
    return bytes(out)


def _is_nifti(head: bytes) -> bool:
    return len(head) >= 4 and (
        struct.unpack("<i", head[:4])[0] in (348, 540) or struct.unpack(">i", head[:4])[0] in (348, 540)
    )


# --- NRRD -------------------------------------------------------------------------------------------------------------
# the numpy reader's non-spatial kinds and the rarer ones it refuses; every one counts as non-spatial here
_NONSPATIAL_KINDS = NONSPATIAL_KINDS | {
    "2d-masked-symmetric-matrix",
    "3d-masked-symmetric-matrix",
    "2d-masked-matrix",
    "3d-masked-matrix",
    "time",
}


def _text_header_end(head: bytes) -> Optional[int]:
    m = re.search(rb"\r?\n\r?\n", head)
    return None if m is None else m.start()


def _nrrd(head: bytes, what: str, name: str) -> ImageHeader:
    end = _text_header_end(head)
    if end is None:
        raise _refuse(
            what,
            name,
            f"has no end to its NRRD header within {HEADER_LIMIT // 1024} KB (a blank line must "
            "separate it from attached data; a detached header is refused)",
        )
    fields: dict[str, str] = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if not line.strip() or line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise _refuse(what, name, "has a malformed NRRD header line")
        fields[" ".join(key.lower().split())] = value.strip()
    if "data file" in fields or "datafile" in fields:
        return ImageHeader("nrrd", (), 1, "", 1, (), False, False, "its NRRD header names a separate data file")
    try:
        dim = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
        ntype = fields["type"].lower()
    except KeyError as e:
        raise _refuse(what, name, f"has an NRRD header without the required field {e.args[0]!r}") from None
    except ValueError:
        raise _refuse(what, name, "has an NRRD header with a malformed dimension or sizes field") from None
    if len(sizes) != dim or not 1 <= dim <= 16 or any(s < 1 for s in sizes):
        raise _refuse(what, name, f"has NRRD sizes {_dims(sizes[:8])} that do not match dimension {dim}")
    types = NRRD_TYPES
    if ntype not in types:
        raise _refuse(what, name, f"has an unsupported NRRD type {fields['type'][:40]!r}")
    itemsize = int(types[ntype][1])
    if "space directions" in fields:
        dirs = re.findall(r"\([^)]*\)|none", fields["space directions"])
        spatial = [i for i, d in enumerate(dirs) if d != "none"]
        spacing = []
        for i in spatial:
            try:
                spacing.append(math.sqrt(sum(float(v) ** 2 for v in dirs[i].strip("()").split(","))))
            except ValueError:
                raise _refuse(what, name, "has malformed NRRD space directions") from None
    else:
        kinds = fields.get("kinds", "").lower().split()
        spatial = [i for i in range(dim) if not (i < len(kinds) and kinds[i] in _NONSPATIAL_KINDS)]
        sp = fields.get("spacings", "").split()
        spacing = []
        for i in spatial:
            try:
                spacing.append(abs(float(sp[i])) if i < len(sp) and sp[i].lower() != "nan" else 1.0)
            except ValueError:
                raise _refuse(what, name, "has malformed NRRD spacings") from None
    spatial = [i for i in spatial if i < dim]
    size = tuple(sizes[i] for i in spatial)
    components = math.prod(s for i, s in enumerate(sizes) if i not in spatial)
    encoding = fields.get("encoding", "raw").lower()
    return ImageHeader(
        "nrrd",
        size,
        components,
        {
            "i1": "int8",
            "u1": "uint8",
            "i2": "int16",
            "u2": "uint16",
            "i4": "int32",
            "u4": "uint32",
            "i8": "int64",
            "u8": "uint64",
            "f4": "float32",
            "f8": "float64",
        }.get(types[ntype], ntype),
        itemsize,
        tuple(spacing[: len(size)]),
        True,
        encoding not in ("raw",),
    )


# --- MetaImage --------------------------------------------------------------------------------------------------------
_MET_TYPES = {
    "met_char": ("int8", 1),
    "met_uchar": ("uint8", 1),
    "met_short": ("int16", 2),
    "met_ushort": ("uint16", 2),
    "met_int": ("int32", 4),
    "met_uint": ("uint32", 4),
    "met_long": ("int32", 4),
    "met_ulong": ("uint32", 4),
    "met_long_long": ("int64", 8),
    "met_ulong_long": ("uint64", 8),
    "met_float": ("float32", 4),
    "met_double": ("float64", 8),
}
_META_LINE = re.compile(rb"^\s*[A-Za-z][A-Za-z0-9_]*\s*=")


def _looks_like_metaimage(head: bytes) -> bool:
    first = head.lstrip()[:200].split(b"\n", 1)[0]
    return bool(_META_LINE.match(first))


def _metaimage(head: bytes, what: str, name: str, file_size: int) -> ImageHeader:
    fields: dict[str, str] = {}
    data_file = None
    for raw in head.split(b"\n"):
        line = raw.decode("latin-1").strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            break  # past the header (binary data) without an ElementDataFile: refused below
        key = key.strip().lower()
        fields[key] = value.strip()
        if key == "elementdatafile":  # MetaIO stops reading the header here
            data_file = value.strip()
            break
    if data_file is None:
        raise _refuse(
            what,
            name,
            f"has no ElementDataFile line within the first {HEADER_LIMIT // 1024} KB of its MetaImage header",
        )
    if data_file.lower() != "local":
        return ImageHeader(
            "metaimage",
            (),
            1,
            "",
            1,
            (),
            False,
            False,
            "its MetaImage header points to a separate data file (ElementDataFile is not LOCAL)",
        )
    try:
        ndims = int(fields.get("ndims", "0"))
        size = tuple(int(s) for s in fields["dimsize"].split())
    except KeyError:
        raise _refuse(what, name, "has a MetaImage header without DimSize") from None
    except ValueError:
        raise _refuse(what, name, "has a MetaImage header with a malformed NDims or DimSize") from None
    if (ndims and len(size) != ndims) or not size or any(s < 1 for s in size):
        raise _refuse(what, name, f"has a MetaImage DimSize {_dims(size[:8])} that does not match NDims {ndims}")
    etype = fields.get("elementtype", "").lower()
    base = etype[: -len("_array")] if etype.endswith("_array") else etype
    if base not in _MET_TYPES:
        raise _refuse(what, name, f"has an unsupported MetaImage ElementType {fields.get('elementtype', '')[:40]!r}")
    tname, itemsize = _MET_TYPES[base]
    try:
        components = int(fields.get("elementnumberofchannels", "1"))
    except ValueError:
        raise _refuse(what, name, "has a malformed MetaImage ElementNumberOfChannels") from None
    if components < 1:
        raise _refuse(what, name, "has a MetaImage ElementNumberOfChannels below 1")
    spacing_text = fields.get("elementspacing") or fields.get("elementsize") or ""
    try:
        spacing = tuple(abs(float(s)) for s in spacing_text.split()) or (1.0,) * len(size)
    except ValueError:
        raise _refuse(what, name, "has a malformed MetaImage ElementSpacing") from None
    compressed = fields.get("compresseddata", "false").lower() in ("true", "1", "yes")
    try:  # ITK allocates this much before reading: never more than the file holds
        compressed_size = int(fields.get("compresseddatasize", "0") or 0)
    except ValueError:
        raise _refuse(what, name, "has a malformed MetaImage CompressedDataSize") from None
    if compressed_size > file_size:
        raise _refuse(what, name, f"announces {compressed_size:,} bytes of compressed data but holds {file_size:,}")
    return ImageHeader("metaimage", size, components, tname, itemsize, spacing[: len(size)], True, compressed)


# --- entry points -----------------------------------------------------------------------------------------------------
def read_header(
    path: Union[str, os.PathLike],
    *,
    name: Optional[str] = None,
    what: str = "image",
    follow_symlinks: Optional[bool] = None,
) -> ImageHeader:
    """Parse the header of the image file at ``path`` (at most :data:`HEADER_LIMIT` bytes are read).

    The format is recognised from the content and must agree with the file's ending (``.nii.gz`` gzip-compressed
    NIfTI, ``.nii`` NIfTI, ``.nrrd`` NRRD, ``.mha`` MetaImage), the way ITK will pick its reader.

    Raises:
        InvalidInputError: not a regular file, unrecognised or malformed header, content that does not match the
            file's ending.
    """
    name = name or Path(path).name
    follow = current_limits().follow_symlinks if follow_symlinks is None else follow_symlinks
    suffix = _suffix(Path(path).name)
    with open_regular(path, name=name, what=what, follow_symlinks=follow) as fh:
        head = fh.read(HEADER_LIMIT)
        if not head:
            raise _refuse(what, name, "is empty or missing; send a NIfTI, NRRD or MHA volume")
        if suffix in DETACHED_SUFFIXES:
            return ImageHeader(
                {".nhdr": "nrrd", ".mhd": "metaimage"}.get(suffix, "nifti1"),
                (),
                1,
                "",
                1,
                (),
                False,
                False,
                f"it is a detached header ({suffix}) whose voxel data live in another file",
            )
        if head[:2] == b"\x1f\x8b":
            inflated = _inflate_head(fh, head, 540)
            if len(inflated) < 348:
                raise _refuse(
                    what,
                    name,
                    "could not be read as an image: its gzip data are corrupt or end before "
                    "a NIfTI header; is it a complete .nii.gz file?",
                )
            header, found = _nifti(inflated, what, name, compressed=True), "nifti-gz"
        elif head.startswith(b"NRRD000"):
            header, found = _nrrd(head, what, name), "nrrd"
        elif _is_nifti(head):
            header, found = _nifti(head, what, name, compressed=False), "nifti"
        elif _looks_like_metaimage(head):
            header, found = _metaimage(head, what, name, os.fstat(fh.fileno()).st_size), "metaimage"
        else:
            raise _refuse(
                what,
                name,
                "is not a recognised image type; send a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha) volume",
            )
    expected = SUFFIX_FORMATS.get(suffix)
    if expected is not None and expected != found and header.attached:
        described = {
            "nifti-gz": "gzip-compressed NIfTI",
            "nifti": "uncompressed NIfTI",
            "nrrd": "NRRD",
            "metaimage": "MetaImage",
        }
        ending = {v: k for k, v in SUFFIX_FORMATS.items()}[found]
        raise _refuse(
            what, name, f"holds {described[found]} data but its name ends with {suffix}; rename it to {ending}"
        )
    return header


def inspect_image(
    path: Union[str, os.PathLike],
    *,
    name: Optional[str] = None,
    what: str = "image",
    limits: Optional[ImageLimits] = None,
) -> ImageHeader:
    """:func:`read_header`, then refuse detached data (422) and images over the voxel budget (413).

    Call it before any reader opens ``path``; it never opens any other file.
    """
    name = name or Path(path).name
    limits = limits or current_limits()
    header = read_header(path, name=name, what=what, follow_symlinks=limits.follow_symlinks)
    if not header.attached:
        raise InvalidInputError(
            f"the {what} file {name!r} does not hold its voxel data: {header.why_detached}. Only data attached to "
            "the file itself are read; save the volume as a single file (.nii.gz, .nrrd or .mha)"
        )
    if any(not math.isfinite(s) for s in header.spacing):
        raise _refuse(what, name, "has a voxel spacing that is not a finite number")
    check_voxel_budget(header, name=name, what=what, limits=limits)
    return header


def check_voxel_budget(
    header: ImageHeader, *, name: str, what: str = "image", limits: Optional[ImageLimits] = None
) -> None:
    limits = limits or current_limits()
    if header.values > limits.max_voxels:
        comp = f" x {header.components} components" if header.components > 1 else ""
        raise PayloadTooLargeError(
            f"the {what} {name!r} has {header.values:,} voxel values ({_dims(header.size)}{comp}); this server reads "
            f"at most {limits.max_voxels:,} per image ({limits.how_to_raise('max_voxels')})",
            code="image_too_large",
        )


def model_space_voxels(size: Sequence[int], spacing: Sequence[float], model_spacing: Sequence[float]) -> int:
    """Voxels of an image of ``size`` x ``spacing`` (mm) once resampled to ``model_spacing``.

    The physical volume over the model's voxel volume: reorientation only permutes the axes, so the product does not
    depend on it (each axis rounded up, as MONAI's ``Spacing`` does, bounds it above by at most one voxel per axis).
    """
    extent = [max(int(n), 1) * max(float(s), 0.0) for n, s in zip(size, spacing, strict=False)]
    ms = [max(float(m), 1e-12) for m in model_spacing]
    if len(extent) != len(ms):
        return math.prod(int(n) for n in size)
    physical = math.prod(extent)
    voxel = math.prod(ms)
    if not math.isfinite(physical) or physical / voxel > 2**62:
        return 2**62
    return int(math.ceil(physical / voxel))


def check_model_space_budget(
    size: Sequence[int],
    spacing: Sequence[float],
    model_spacing: Sequence[float],
    *,
    name: str,
    model_id: str = "the model",
    limits: Optional[ImageLimits] = None,
) -> int:
    """Refuse (413) an image whose model-space resampling would exceed ``max_model_voxels``; returns the count."""
    limits = limits or current_limits()
    n = model_space_voxels(size, spacing, model_spacing)
    if n > limits.max_model_voxels:
        extent = " x ".join(f"{max(int(a), 1) * float(b):.4g}" for a, b in zip(size, spacing, strict=False))
        raise PayloadTooLargeError(
            f"the image {name!r} ({_dims(size)} voxels of {' x '.join(f'{float(s):.4g}' for s in spacing)} mm, "
            f"{extent} mm) becomes about {n:,} voxels at {model_id}'s spacing "
            f"{' x '.join(f'{float(s):g}' for s in model_spacing)} mm; this server resamples at most "
            f"{limits.max_model_voxels:,} ({limits.how_to_raise('max_model_voxels')}). Check the image's spacing",
            code="image_too_large",
        )
    return n


__all__ = [
    "ImageHeader",
    "ImageLimits",
    "read_header",
    "inspect_image",
    "open_regular",
    "check_voxel_budget",
    "model_space_voxels",
    "check_model_space_budget",
    "image_limits",
    "current_limits",
    "default_limits",
    "memory_voxel_budget",
    "HEADER_LIMIT",
]
