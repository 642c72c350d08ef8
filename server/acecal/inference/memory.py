"""Running out of memory is the input's size, not a server fault: it becomes a 413 with the memory already freed.

Stdlib only: used by the inference pipeline, the server's upload and evaluation paths and the CLI alike.
"""

from __future__ import annotations

import gc
from typing import Callable, Optional, TypeVar

from acecal.errors import PayloadTooLargeError

__all__ = ["DEVICE_MEMORY", "HOST_MEMORY", "memory_bounded", "out_of_memory"]

T = TypeVar("T")

HOST_MEMORY = "this server's memory"
DEVICE_MEMORY = "the device's memory"


def out_of_memory(e: Optional[BaseException]) -> bool:
    """MemoryError, or torch's allocation failures (CPU ``can't allocate memory``, CUDA ``out of memory``), also when
    wrapped (MONAI re-raises a transform's error as ``RuntimeError: applying transform ...`` from it)."""
    for _ in range(8):  # along the chain of causes
        if e is None:
            return False
        if isinstance(e, MemoryError):
            return True
        text = str(e).lower()
        if isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text):
            return True
        e = e.__cause__ or e.__context__
    return False


def memory_bounded(call: Callable[[], T], subject: str, where: str = HOST_MEMORY) -> T:
    """``call()``; running out of memory becomes a :class:`~acecal.errors.PayloadTooLargeError` (413) about
    ``subject`` (e.g. ``"the image 'scan.nrrd'"``) raised only after the failed attempt's exception, its traceback
    and the frames holding its arrays are gone (and collected), so the memory is free before anyone answers."""
    try:
        return call()
    except BaseException as e:  # only memory errors are handled here: the others are re-raised
        if not out_of_memory(e):
            raise
    # outside the except clause: the 413 carries no context, so nothing keeps the failed attempt's frames alive
    gc.collect()
    raise PayloadTooLargeError(
        f"{subject} is too large for {where}; send a smaller volume (or crop it) or use a server with more memory",
        code="image_too_large",
    )
