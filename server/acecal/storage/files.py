"""One way to write a file so that a reader or a crash never sees half of it, and one way to tell a disk problem.

- :func:`atomic_write` writes through a temporary sibling and a rename (``fsync`` of the file and of the folder when
  ``durable``): text, bytes, or anything a ``writer(binary_file)`` callback produces (``torch.save``, say).
- :func:`atomic_write_json` stores JSON with ``allow_nan=False`` after :func:`json_finite` (NaN/inf become null):
  what the server stores is always valid JSON.
- :func:`atomic_folder` builds a folder under a hidden temporary name and renames it into place (a reader sees all
  of it or nothing); :func:`durable_move` / :func:`fsync_path` make a rename durable.
- :func:`is_disk_error` is the one test for "the disk or the data directory is the problem" (full, quota, read-only,
  permissions, I/O error), :func:`storage_error` the matching :class:`acecal.errors.StorageError` (HTTP 507) and
  :func:`storage_guard` the context manager that turns the one into the other. :func:`disk_full` and
  :func:`nearly_full` tell a full disk apart in a job's post-mortem.

Stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Union

from acecal.errors import StorageError

__all__ = [
    "DISK_ERRNOS",
    "atomic_folder",
    "atomic_write",
    "atomic_write_json",
    "disk_full",
    "dumps_finite",
    "durable_move",
    "fsync_path",
    "is_disk_error",
    "json_finite",
    "nearly_full",
    "read_json",
    "storage_error",
    "storage_guard",
]

#: errno values that mean the disk or the data directory, not the request, is the problem
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EIO})
_SQLITE_DISK_WORDS = ("disk is full", "readonly", "disk i/o", "unable to open")

Writer = Callable[[IO[bytes]], Any]


def fsync_path(path: Union[str, os.PathLike[str]]) -> None:
    """``fsync`` a file or a folder (a folder's entry list: makes a rename inside it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(str(path), flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_move(src: Union[str, os.PathLike[str]], dst: Union[str, os.PathLike[str]]) -> None:
    """Move ``src`` to ``dst`` (same file system) so that after a crash either nothing or the whole file is there."""
    fsync_path(src)
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def atomic_write(
    path: Union[str, os.PathLike[str]], content: Union[str, bytes, Writer], *, durable: bool = True
) -> Path:
    """Write ``content`` to ``path`` through a temporary sibling and a rename; returns ``path``.

    Args:
        content: text (UTF-8), bytes, or a callable that writes into the open binary file (e.g.
            ``lambda fh: torch.save(obj, fh)``).
        durable: ``fsync`` the file before the rename and the folder after it (survives a power cut, not only a
            crash of the process).
    """
    path = Path(path)
    # pid + thread: concurrent writers of the same file never share a temporary name
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            if isinstance(content, str):
                fh.write(content.encode("utf-8"))
            elif isinstance(content, (bytes, bytearray, memoryview)):
                fh.write(content)
            else:
                content(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


@contextlib.contextmanager
def atomic_folder(
    path: Union[str, os.PathLike[str]], *, tmp_name: Optional[str] = None, durable: bool = False
) -> Iterator[Path]:
    """Build the folder ``path`` inside the block, in a hidden sibling (``tmp_name``, default ``.<name>.tmp``) that is
    renamed to ``path`` when the block returns and removed when it raises. ``path`` must not exist yet.

    ``durable``: ``fsync`` the parent folder after the rename (the files inside are the block's business).
    """
    path = Path(path)
    tmp = path.with_name(tmp_name or f".{path.name}.tmp")
    try:
        tmp.mkdir(parents=True)
        yield tmp
        os.rename(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_finite(obj: Any) -> Any:
    """``obj`` with every NaN/infinite float replaced by None (recursively through dicts, lists and tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_finite(v) for v in obj]
    return obj


def dumps_finite(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_finite` with ``allow_nan=False``: a non-finite number can never be written."""
    return json.dumps(json_finite(obj), allow_nan=False, **kwargs)


def atomic_write_json(
    path: Union[str, os.PathLike[str]], obj: Any, *, durable: bool = True, **dumps_kwargs: Any
) -> Path:
    """:func:`atomic_write` of :func:`dumps_finite` ``(obj)``."""
    return atomic_write(path, dumps_finite(obj, **dumps_kwargs), durable=durable)


def is_disk_error(e: BaseException) -> bool:
    """Whether ``e`` means the disk or the data directory is the problem (full, quota, read-only, permissions, I/O),
    for an ``OSError`` or an ``sqlite3.Error``."""
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return True
    text = str(e).lower()
    return isinstance(e, sqlite3.Error) and any(s in text for s in _SQLITE_DISK_WORDS)


def storage_error(e: BaseException, what: str) -> StorageError:
    """The :class:`StorageError` (507) for a disk error ``e`` while writing ``what``."""
    reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
    return StorageError(f"cannot write {what}: {reason}; free disk space or fix the data directory's permissions")


@contextlib.contextmanager
def storage_guard(what: str) -> Iterator[None]:
    """Turn disk errors raised inside the block into :class:`StorageError` (507); other errors pass through."""
    try:
        yield
    except (OSError, sqlite3.Error) as e:
        if is_disk_error(e):
            raise storage_error(e, what) from None
        raise


def nearly_full(*paths: Union[str, os.PathLike[str]], limit: int = 1 << 20) -> bool:
    """Whether any of ``paths`` (that exists) has less than ``limit`` bytes free."""
    for p in paths:
        try:
            if shutil.disk_usage(p).free < limit:
                return True
        except OSError:
            continue
    return False


def disk_full(e: BaseException, *paths: Union[str, os.PathLike[str]]) -> bool:
    """Whether ``e`` is most likely a full disk: ENOSPC/EDQUOT (on it or its cause), or a failed write with (almost)
    no space left on ``paths`` (torch reports a short write as e.g. "unexpected pos 62848 vs 62736")."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = str(e).lower()
    if "no space left" in text or "disk quota" in text:
        return True
    writing = isinstance(e, OSError) or any(s in text for s in ("write", "unexpected pos", "inline_container"))
    return nearly_full(*paths, limit=(16 if writing else 1) * 1024 * 1024)


def read_json(path: Union[str, os.PathLike[str]], default: Optional[Any] = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file is missing."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
