"""Prometheus duration syntax: ``30s``, ``2m``, ``1h30m``, ``7d``, ``500ms``."""

from __future__ import annotations

import itertools
import re

# Largest first: Prometheus accepts each unit at most once, in this order.
_UNITS = {
    "y": 31536000.0,
    "w": 604800.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 0.001,
}
# What format_duration writes, largest first, in milliseconds.
_SIZES = (("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000), ("ms", 1))
_PART = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration; ``ValueError`` if it is not one."""
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration (use e.g. 30s, 2m, 1h30m, 7d)")
    ranks = [list(_UNITS).index(unit) for _, unit in parts]
    if any(a >= b for a, b in itertools.pairwise(ranks)):
        raise ValueError(f"{text!r} is not a duration: units must go from largest to smallest")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """The shortest Prometheus duration for ``seconds`` (for logs and messages)."""
    millis = max(0, round(seconds * 1000))
    parts: list[str] = []
    for unit, size in _SIZES:
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
