"""How the status page says times, durations and numbers: in plain words, in the largest
units that matter, a number never parted from its unit, long text cut with the whole in a
tooltip."""

from __future__ import annotations

import datetime as dt
import html
import math
import re

# Ages in words: the two largest units, truncated (seconds at most: never milliseconds).
_UNITS = ((86400, "day", "days"), (3600, "h", "h"), (60, "min", "min"), (1, "s", "s"))
ID_CHARS = 40  # longer IDs are cut, the whole in the tooltip


def age_in_words(seconds: float) -> str:
    """How long ago (``seconds`` > 0) or how soon (< 0), as a person says it: ``3 min ago``,
    ``2 h 5 min ago``, ``4 days ago``, ``in 12 min``; ``just now`` within a second."""
    if abs(seconds) < 1:
        return "just now"
    if seconds < 0:
        return f"in {in_words(-seconds)}"
    return f"{in_words(seconds)} ago"


def in_words(seconds: float) -> str:
    """A duration in its two largest units, truncated to whole seconds, a zero second unit
    left out: ``2 h 5 min``, ``1 day 23 h``, ``4 days``, ``40 s``; ``0 s`` below a second."""
    left = int(seconds)
    counts = []
    for size, one, many in _UNITS:
        count, left = divmod(left, size)
        counts.append(f"{count} {one if count == 1 else many}" if count else "")
    first = next((i for i, text in enumerate(counts) if text), None)
    if first is None:
        return "0 s"
    return " ".join(text for text in counts[first : first + 2] if text)


def number(value: float, places: int = 4) -> str:
    """Rounded to ``places`` decimals, trailing zeros trimmed: ``3.15``, not
    ``3.149999999999989``. NaN, inf or 1e300 (from an old state file) as Python writes them,
    not 300 digits wide."""
    if not (math.isfinite(value) and abs(value) < 1e12):
        return html.escape(str(value))
    text = f"{value:.{places}f}"
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return "0" if text == "-0" else text


def rate(per_minute: float | None) -> str:
    return "&ndash;" if per_minute is None else f"{number(per_minute, 1)}/min"


def clipped(text: str, limit: int) -> str:
    """``text`` escaped; past ``limit`` characters cut, whole in the title."""
    if len(text) <= limit:
        return html.escape(text)
    return f'<span title="{html.escape(text)}">{html.escape(text[: limit - 1])}&hellip;</span>'


def when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "never"
    try:
        iso = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        # NaN, infinite, or outside the years 1-9999 (a registration or a state file from
        # before times were checked): said as it is, so one bad message cannot take the page.
        return f'<span title="not a valid time">invalid ({html.escape(str(timestamp))})</span>'
    return f'<time datetime="{iso}" title="{iso}">{unbroken(age_in_words(now - timestamp))}</time>'


def unbroken(words: str) -> str:
    """A number and its unit kept on one line: ``3 days`` never ends a line after ``3``."""
    return re.sub(r"([0-9]) ", r"\1&nbsp;", words)
