"""Builders of hostile image files for the hostile-input suites (server, client, CLI, header parser).

Each builder returns the bytes (or writes the file) an attacker would send: headers that point to another file, gzip
streams that inflate far beyond their size, headers announcing absurd sizes. numpy + nibabel + zlib only.
"""

from __future__ import annotations

import gzip
import os
import struct
import uuid
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def secret_file(folder: Path, name: str = "secret.bin") -> tuple[Path, bytes]:
    """A file the server must never read: ``(path, token)``; the token fills it (4 KiB), so any leak shows it."""
    token = b"ACECAL-SECRET-" + uuid.uuid4().hex.encode()
    path = Path(folder) / name
    path.write_bytes((token * (4096 // len(token) + 1))[:4096])
    return path, token


def fifo(folder: Path, name: str = "pipe") -> Path:
    """A named pipe nobody writes to: opening it for reading (blocking) would hang forever."""
    path = Path(folder) / name
    os.mkfifo(path)
    return path


def mha_pointer(
    target: str, size: Sequence[int] = (16, 16, 16), element_type: str = "MET_SHORT", key: str = "ElementDataFile"
) -> bytes:
    """A MetaImage header whose voxel data are 'in' ``target`` (an absolute or relative path)."""
    return (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"DimSize = {' '.join(map(str, size))}\nElementSpacing = 1 1 1\nElementType = {element_type}\n"
        f"{key} = {target}\n"
    ).encode()


def nrrd_header(
    sizes: Sequence[int] = (16, 16, 16), ntype: str = "short", encoding: str = "raw", extra: str = ""
) -> bytes:
    """An NRRD header (ending with its blank line) announcing ``sizes``; no voxel data follow."""
    return (
        f"NRRD0004\ntype: {ntype}\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {' '.join(map(str, sizes))}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
        f"kinds: domain domain domain\nendian: little\nencoding: {encoding}\nspace origin: (0,0,0)\n"
        f"{extra}\n"
    ).encode()


def nrrd_pointer(
    target: str,
    sizes: Sequence[int] = (16, 16, 16),
    ntype: str = "short",
    key: str = "data file",
    encoding: str = "raw",
) -> bytes:
    """An NRRD header whose voxel data are 'in' ``target``."""
    return nrrd_header(sizes, ntype, encoding, extra=f"{key}: {target}\n")


def nifti_header(
    shape: Sequence[int], dtype=np.float32, spacing: Sequence[float] = (1.0, 1.0, 1.0), magic: Optional[bytes] = None
) -> bytes:
    """A NIfTI-1 header (348 bytes + the 4-byte extension flag) announcing ``shape``; no voxel data."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(tuple(shape))
    hdr.set_data_dtype(dtype)
    hdr.set_zooms(tuple(spacing)[: len(shape)])
    hdr.set_qform(np.diag([*spacing[:3], 1.0]), code=1)
    block = bytearray(hdr.binaryblock)
    if magic is not None:
        block[344:348] = magic
    return bytes(block) + b"\x00\x00\x00\x00"


def _zeros_stream(compressor, nbytes: int, chunk: int = 1 << 22):
    block = bytes(chunk)
    left = nbytes
    while left > 0:
        n = min(chunk, left)
        yield compressor.compress(block[:n])
        left -= n


#: an invalid deflate block (BFINAL=1, reserved BTYPE=11): inflating into it fails
CORRUPT_DEFLATE = b"\xff" * 4096


def _stream(prefix: bytes, payload_bytes: int, corrupt_after: Optional[int], block: int = 1 << 22) -> bytes:
    """gzip of ``prefix`` + ``payload_bytes`` zeros; with ``corrupt_after``, the stream turns invalid after that many
    zeros (a reader that inflates further fails; one that stops before never sees it).

    Fast for hundreds of MB: after a full flush deflate restarts from scratch, so every full block of zeros compresses
    to the same bytes, computed once; the gzip container (header, CRC-32, size) is written around the raw stream.
    """
    zeros = payload_bytes if corrupt_after is None else corrupt_after
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", c.compress(prefix), c.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(prefix)
    full, rest = divmod(zeros, block)
    if full:
        zero_block = bytes(block)
        compressed = c.compress(zero_block) + c.flush(zlib.Z_FULL_FLUSH)
        parts += [compressed] * full
        for _ in range(full):
            crc = zlib.crc32(zero_block, crc)
    parts += [c.compress(bytes(rest)), c.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(bytes(rest), crc)
    if corrupt_after is not None:
        return b"".join(parts) + CORRUPT_DEFLATE
    parts.append(c.flush(zlib.Z_FINISH))
    parts.append(struct.pack("<II", crc & 0xFFFFFFFF, (len(prefix) + zeros) & 0xFFFFFFFF))
    return b"".join(parts)


def nifti_gz_bomb(
    shape: Sequence[int], payload_bytes: int, dtype=np.float32, *, corrupt_after: Optional[int] = None
) -> bytes:
    """A ``.nii.gz`` announcing ``shape`` whose gzip stream inflates to the header + ``payload_bytes`` of zeros
    (a few hundred KB of file for hundreds of MB; or, with ``corrupt_after``, turns invalid after that many)."""
    return _stream(nifti_header(shape, dtype), payload_bytes, corrupt_after)


def nrrd_gzip_bomb(
    sizes: Sequence[int], payload_bytes: int, ntype: str = "float", *, corrupt_after: Optional[int] = None
) -> bytes:
    """An NRRD with ``encoding: gzip`` announcing ``sizes``; its stream inflates to ``payload_bytes`` of zeros."""
    return nrrd_header(sizes, ntype, "gzip") + _stream(b"", payload_bytes, corrupt_after)


def gz(data: bytes) -> bytes:
    return gzip.compress(data)
