"""Config validation: every error names the field, the value and what is allowed, before any compute."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any


def skip_range(field: str, value: Any, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an int >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"{field}: must be {allowed}, got {value!r}")
    return value


def int_at_least(field: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field}: must be an int >= {low}, got {value!r}")
    return value


def timestep_range(field: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{field}: must be a (lo, hi) pair of numbers with lo < hi, got {value!r}")
    lo, hi = value
    for bound in (lo, hi):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise ValueError(f"{field}: bounds must be finite numbers, got {value!r}")
    if not lo < hi:
        raise ValueError(f"{field}: must satisfy lo < hi, got {value!r}")
    return (lo, hi)


def threshold(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{field}: must be a finite number >= 0, got {value!r}")
    return float(value)


def positive_number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field}: must be a finite number > 0, got {value!r}")
    return float(value)


def choice(field: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{field}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


def callback(field: str, value: Any, *, allow_none: bool = True) -> Callable | None:
    if value is None and allow_none:
        return None
    if not callable(value):
        raise TypeError(f"{field}: must be callable{' or None' if allow_none else ''}, got {type(value).__name__}")
    return value


def boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{field}: must be a bool, got {value!r}")
    return value


def identifiers(field: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{field}: must be a tuple or list of regex strings, got {value!r}")
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(f"{field}: every identifier must be a regex string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{field}: {pattern!r} is not a valid regex ({error})") from None
    return tuple(value)
