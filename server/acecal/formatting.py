"""Numbers as reports, model cards and the command line show them: one rule for "no value" and one spelling of it.

- :func:`finite_or_none`: a metric as a plain float, None when it is missing or not finite (what JSON reports store);
- :func:`number`, :func:`percent`, :func:`signed_percent`, :func:`ratio`, :func:`duration`: text, ``n/a`` for None.

Stdlib only: the light CLI imports it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["MISSING", "duration", "finite_or_none", "number", "percent", "ratio", "signed_percent"]

#: how a missing value is written
MISSING = "n/a"


def finite_or_none(v: Any) -> Optional[float]:
    """``v`` as a float (0-d tensors and numpy scalars included); None when it is None, NaN or infinite."""
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    v = float(v)
    return v if math.isfinite(v) else None


def number(v: Any, digits: int = 4) -> str:
    """``0.1235`` for 0.12345 with 4 digits; ``n/a`` for None; anything that is not a number as its text."""
    if v is None:
        return MISSING
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)


def percent(fraction: Any, digits: int = 1) -> str:
    """A fraction as a percentage: ``12.5 %`` for 0.125; ``n/a`` for None."""
    return MISSING if fraction is None else f"{100 * float(fraction):.{digits}f} %"


def signed_percent(pct: Any, digits: int = 1) -> str:
    """A change already in percent, with its sign: ``-7.2 %``; ``n/a`` for None."""
    return MISSING if pct is None else f"{float(pct):+.{digits}f} %"


def ratio(v: Any, digits: int = 2) -> str:
    """A ratio: ``1.50x``; ``n/a`` for None."""
    return MISSING if v is None else f"{float(v):.{digits}f}x"


def duration(seconds: Any) -> str:
    """``45 s``, ``12.5 min`` or ``3.20 h`` (None counts as 0)."""
    s = float(seconds or 0)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"
