"""acecal.storage.files: the one atomic write and the one disk-error test."""

import errno
import json
import sqlite3
import threading

import pytest

from acecal.errors import StorageError
from acecal.storage.files import atomic_write, atomic_write_json, disk_full, durable_move, is_disk_error, storage_guard


def test_atomic_write_text_bytes_and_writer(tmp_path):
    assert atomic_write(tmp_path / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "w.bin", lambda fh: fh.write(b"xyz"), durable=False).read_bytes() == b"xyz"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write(tmp_path / "state.json", "old")

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_concurrent_writers_never_leave_a_mixed_file(tmp_path):
    target = tmp_path / "f.txt"
    texts = [str(i) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write, args=(target, t), kwargs={"durable": False}) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_json_is_always_valid(tmp_path):
    p = atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": (1, -float("inf"))})
    assert json.loads(p.read_text()) == {"a": None, "b": [None, 1.5], "c": [1, None]}


def test_durable_move(tmp_path):
    src = atomic_write(tmp_path / "a", "x")
    (tmp_path / "d").mkdir()
    durable_move(src, tmp_path / "d" / "b")
    assert not src.exists() and (tmp_path / "d" / "b").read_text() == "x"


@pytest.mark.parametrize(
    "e, disk",
    [
        (OSError(errno.ENOSPC, "full"), True),
        (OSError(errno.EROFS, "ro"), True),
        (OSError(errno.EACCES, "perm"), True),
        (OSError(errno.ENOENT, "missing"), False),
        (ValueError("x"), False),
        (sqlite3.OperationalError("database or disk is full"), True),
        (sqlite3.OperationalError("no such table"), False),
    ],
)
def test_is_disk_error(e, disk):
    assert is_disk_error(e) is disk


def test_storage_guard_maps_disk_errors_only():
    with pytest.raises(StorageError, match="cannot write the upload: No space left"):
        with storage_guard("the upload"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(FileNotFoundError):
        with storage_guard("the upload"):
            raise FileNotFoundError(errno.ENOENT, "gone")


def test_disk_full_sees_the_cause(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("torch.save failed") from inner
    except RuntimeError as e:
        assert disk_full(e, tmp_path)
    assert not disk_full(ValueError("bad value"), tmp_path)
