"""The torch-free client's NRRD reader (acecal.nrrd) on hostile files: it reads the file it is given and nothing else,
never blocks, and inflates compressed data only as far as the header announces."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from hostile import fifo, nrrd_gzip_bomb, nrrd_header, nrrd_pointer, secret_file

from acecal.nrrd import NrrdError, decode_nrrd, read_nrrd


@pytest.mark.parametrize("key", ["data file", "datafile"])
@pytest.mark.parametrize("relative", [False, True])
def test_a_header_pointing_to_another_file_is_refused(tmp_path, key, relative):
    secret, token = secret_file(tmp_path)
    (tmp_path / "up").mkdir()
    target = os.path.relpath(secret, tmp_path / "up") if relative else str(secret)
    path = tmp_path / "up" / "result.nrrd"
    path.write_bytes(nrrd_pointer(target, sizes=(16, 16, 16), ntype="uchar", key=key))
    with pytest.raises(NrrdError, match="detached") as e:
        read_nrrd(path)
    assert token.decode() not in str(e.value)
    with pytest.raises(NrrdError, match="detached"):
        decode_nrrd(path.read_bytes())
    (tmp_path / "up" / "x.nhdr").write_bytes(nrrd_pointer(target))
    with pytest.raises(NrrdError, match="detached"):
        read_nrrd(tmp_path / "up" / "x.nhdr")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    pipe = fifo(tmp_path, "labels.nrrd")
    errors = []

    def read():
        try:
            read_nrrd(pipe)
        except NrrdError as e:
            errors.append(str(e))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "read_nrrd blocked on a FIFO"
    assert errors and "not a regular file" in errors[0]


def test_gzip_data_are_inflated_only_as_far_as_announced(tmp_path):
    """The stream turns invalid 64 KB past the announced 16^3 float32: a reader inflating further would fail."""
    need = 16**3 * 4
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(nrrd_gzip_bomb((16, 16, 16), 0, corrupt_after=need + (64 << 10)))
    vol = read_nrrd(path)
    assert vol.array.shape == (16, 16, 16) and not vol.array.any()
    # a real bomb (64 MB of zeros in ~64 KB) announcing 16^3: decoded at once, without inflating the rest
    path.write_bytes(nrrd_gzip_bomb((16, 16, 16), 64 << 20))
    t0 = time.perf_counter()
    assert read_nrrd(path).array.shape == (16, 16, 16)
    assert time.perf_counter() - t0 < 0.1


def test_absurd_skips_end_at_once(tmp_path):
    body = np.zeros(16**3, np.int16).tobytes()
    path = tmp_path / "skip.nrrd"
    path.write_bytes(nrrd_header(extra="line skip: 1000000000000\n") + body)
    t0 = time.perf_counter()
    with pytest.raises(NrrdError, match="truncated"):
        read_nrrd(path)
    assert time.perf_counter() - t0 < 1.0
    path.write_bytes(nrrd_header(extra="byte skip: -7\n") + body)
    with pytest.raises(NrrdError, match="negative"):
        read_nrrd(path)
