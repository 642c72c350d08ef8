"""Multipart uploads streamed straight into the data directory.

The upload routes read their ``multipart/form-data`` body themselves (python-multipart's streaming parser) instead of
declaring ``File``/``Form`` parameters, for three reasons:

- the route runs *before* the body is read, so it refuses an unknown model or dataset (404) and a full queue (503)
  without receiving the upload (the API key was checked earlier still, by :class:`acecal.api.auth.APIKeyMiddleware`);
- file parts go to ``<data-dir>/tmp/upload-<random>`` as they arrive (never to the system temporary folder, never
  whole into memory) and are deleted whatever happens;
- text fields are capped (:data:`MAX_FIELD_BYTES`), unknown parts are skipped without being stored.

A received file then gets an ending chosen from its content (:func:`store_upload`: the format's magic bytes decide,
whatever the user's file name says; a detached header is refused). The request schema is still documented in
OpenAPI (:func:`multipart_body`).
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from acecal.data.headers import _is_nifti, _looks_like_metaimage
from acecal.errors import InvalidInputError
from acecal.protocol import DETACHED_HEADER_SUFFIXES
from acecal.storage.files import storage_guard

#: the largest text field accepted (``params``, ``name``, ``model``)
MAX_FIELD_BYTES = 64 * 1024
#: bytes of each file kept in memory to recognise its type
HEAD_BYTES = 512
#: parts accepted in one upload (the routes take two or three)
MAX_PARTS = 16


@dataclass
class ReceivedFile:
    """One file part, on disk under a server-chosen name."""

    field: str
    filename: Optional[str]
    path: Path
    size: int = 0
    head: bytes = b""


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, ReceivedFile] = field(default_factory=dict)

    def file(self, name: str) -> ReceivedFile:
        if name not in self.files:
            raise InvalidInputError(
                f"invalid request: {name}: Field required (send the {name} file as a multipart file part)"
            )
        return self.files[name]

    def discard(self) -> None:
        """Delete every received file (idempotent)."""
        for f in self.files.values():
            f.path.unlink(missing_ok=True)


class _Part:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.name = ""
        self.filename: Optional[str] = None
        self.text = bytearray()
        self.file: Optional[ReceivedFile] = None
        self.handle: Optional[BinaryIO] = None
        self.skip = False


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


async def receive_form(
    request: Request,
    tmp_dir: Path,
    *,
    files: Sequence[str],
    fields: Sequence[str] = (),
    max_field_bytes: int = MAX_FIELD_BYTES,
) -> ReceivedForm:
    """Read the request's multipart body: ``files`` parts to disk under ``tmp_dir``, ``fields`` as text.

    Raises:
        InvalidInputError: not multipart, a text field over ``max_field_bytes``, a file or field sent twice.
        HTTPException 400: a malformed multipart body. Files already written are deleted on any error.
    """
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidInputError(
            f"send the upload as multipart/form-data (file parts {', '.join(files)}), not "
            f"{_decode(ctype) or 'an untyped body'}"
        )
    form = ReceivedForm()
    wanted_files, wanted_fields = set(files), set(fields)
    parts: list[_Part] = []
    pending: list[tuple[_Part, bytes]] = []  # file data to write once the parser has returned
    header_name = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise InvalidInputError(
                f"the upload has more than {MAX_PARTS} parts; send only {', '.join([*files, *fields])}"
            )
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        part = parts[-1]
        _, opts = parse_options_header(part.headers.get(b"content-disposition", b""))
        if b"name" not in opts:
            raise HTTPException(400, "a multipart part has no Content-Disposition name")
        part.name = _decode(opts[b"name"])
        if b"filename" in opts:
            part.filename = _decode(opts[b"filename"])
        if part.name in wanted_files and part.filename is not None:
            if part.name in form.files:
                raise InvalidInputError(f"the file {part.name!r} was sent twice; send one")
            part.file = ReceivedFile(part.name, part.filename, tmp_dir / f"upload-{uuid.uuid4().hex}")
            form.files[part.name] = part.file
        elif part.name in wanted_fields and part.filename is None:
            if part.name in form.fields:
                raise InvalidInputError(f"the form field {part.name!r} was sent twice; send one")
        else:
            part.skip = True  # an unknown part: read past it, keep nothing

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        if part.skip:
            return
        if part.file is not None:
            chunk = bytes(data[start:end])
            part.file.size += len(chunk)
            if len(part.file.head) < HEAD_BYTES:
                part.file.head += chunk[: HEAD_BYTES - len(part.file.head)]
            pending.append((part, chunk))
            return
        part.text.extend(data[start:end])
        if len(part.text) > max_field_bytes:
            raise InvalidInputError(f"the form field {part.name!r} is longer than {max_field_bytes // 1024} KB")

    def on_part_end() -> None:
        part = parts[-1]
        if part.file is None and not part.skip:
            form.fields[part.name] = _decode(bytes(part.text))
        if part.file is not None:
            pending.append((part, b""))  # close the file once written

    def write_pending(batch: list[tuple[_Part, bytes]]) -> None:
        with storage_guard("the upload"):
            for part, chunk in batch:
                if part.handle is None and part.file is not None and chunk:
                    part.handle = open(part.file.path, "xb")
                if chunk and part.handle is not None:
                    part.handle.write(chunk)
                elif not chunk:
                    if part.handle is None and part.file is not None:  # an empty file
                        part.file.path.touch()
                    if part.handle is not None:
                        part.handle.close()
                        part.handle = None

    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if pending:
                batch = pending[:]
                pending.clear()
                await run_in_threadpool(write_pending, batch)
        parser.finalize()
        if pending:
            await run_in_threadpool(write_pending, pending[:])
            pending.clear()
        if any(p.handle is not None for p in parts):
            raise HTTPException(400, "the multipart body ended inside a file part")
    except FormParserError:
        _close(parts)
        form.discard()
        raise HTTPException(400, "the multipart body is malformed") from None
    except ClientDisconnect:
        _close(parts)
        form.discard()
        raise HTTPException(400, "the client disconnected before the upload was complete") from None
    except BaseException:
        _close(parts)
        form.discard()
        raise
    return form


def _close(parts: list[_Part]) -> None:
    for p in parts:
        if p.handle is not None:
            try:
                p.handle.close()
            except OSError:
                pass
            p.handle = None


def display_name(filename: Optional[str]) -> str:
    """The user's file name for messages only: base name, printable characters, at most 100 of them."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch if ch.isprintable() else "?" for ch in base)[:100]
    return base or "upload"


def rename_upload(received: ReceivedFile, suffix: str) -> Path:
    """Give a received file its type's ending (server-chosen name, ``upload-<random><suffix>``)."""
    target = received.path.with_name(received.path.name + suffix)
    if not received.path.exists():
        received.path.touch()
    os.rename(received.path, target)
    received.path = target
    return target


def sniff_suffix(head: bytes) -> Optional[str]:
    """The file ending for the bytes' format (one of :data:`acecal.protocol.UPLOAD_SUFFIXES`), None if unknown."""
    if head.startswith(b"NRRD000"):
        return ".nrrd"
    if head[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if _is_nifti(head):
        return ".nii"
    if _looks_like_metaimage(head):
        return ".mha"
    return None


def upload_suffix(filename: Optional[str], head: bytes, what: str = "image") -> str:
    """A safe suffix for the temporary copy, from the bytes' format; a detached header's name is refused."""
    name = display_name(filename)
    if name.lower().endswith(DETACHED_HEADER_SUFFIXES):
        raise InvalidInputError(
            f"{name!r} is a detached header whose voxel data live in another file; send a "
            "single-file volume (.nrrd, .nii, .nii.gz or .mha)"
        )
    sniffed = sniff_suffix(head)
    if sniffed is None:
        if not head:
            raise InvalidInputError(f"the {what} file {name!r} is empty; send a NIfTI, NRRD or MHA volume")
        raise InvalidInputError(
            f"{name!r} is not a recognised image type; send a NIfTI (.nii, .nii.gz), NRRD (.nrrd) "
            "or MetaImage (.mha) volume"
        )
    return sniffed


def store_upload(received: ReceivedFile, what: str = "image") -> Path:
    """The received file under its server-chosen name with its format's ending."""
    return rename_upload(received, upload_suffix(received.filename, received.head, what))


def multipart_body(files: dict[str, str], fields: dict[str, str], required: Sequence[str]) -> dict:
    """OpenAPI ``requestBody`` of a multipart route (its parameters are read by :func:`receive_form`)."""
    props: dict[str, dict] = {n: {"type": "string", "format": "binary", "description": d} for n, d in files.items()}
    props.update({n: {"type": "string", "description": d} for n, d in fields.items()})
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": props, "required": list(required)}}
            },
        }
    }
