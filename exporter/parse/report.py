"""What every bulk-status parser shares: the body it reads, how it fails, and how one
recipient's raw fields become the aggregator's arguments.

Coercions, so one odd field does not throw away a whole message:
- ``status``: a string as received; missing or null is ``none``; numbers become text.
- ``cost``: a number or numeric string; missing or null is 0; anything else is invalid.
- the unsubscribe flag (``stopMail``, ``stopSMS``): true, or the strings ``true``/``1``, or
  the number 1; anything else is false. Only the shape's own flag counts.
- ``date``: epoch seconds as a string or number; anything else is ignored.
"""

from __future__ import annotations

import math
from typing import Protocol

# Real documents are four levels deep; deeper values inside a report are ignored.
MAX_DEPTH = 32
# Longest raw status kept; it becomes a label value.
MAX_STATUS_LENGTH = 64
MISSING_STATUS = "none"
# A report field whose value is an object or a list.
NESTED = object()


class Body(Protocol):
    """What the parsers read from: a response body, or bytes in tests."""

    def read(self, size: int = -1, /) -> bytes: ...


class Reports(Protocol):
    """Where recipients go: a ``ReportAggregator``."""

    def add(self, status: str, cost: float, stop_mail: bool, date: float | None) -> None: ...


class InvalidResponse(Exception):
    """The body is not a bulk-status document."""


class UpstreamError(Exception):
    """A well-formed error document: ``success`` false with a ``code``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"code {code}: {message}" if message else f"code {code}")


def check_envelope(
    success: object, code: object, message: object, saw_list: bool, list_key: str
) -> None:
    """Raise unless the document said success and held its report list."""
    code_text = error_code(code)
    if success is True and code_text in (None, "200"):
        if not saw_list:
            raise InvalidResponse(f"success without a {list_key}")
        return
    if code_text is None or code_text == "200":
        raise InvalidResponse(f"success is {success!r} with code {code_text}")
    raise UpstreamError(code_text, message if isinstance(message, str) else "")


def error_code(code: object) -> str | None:
    """The upstream ``code`` as a short label value; ``invalid`` if it is not a number."""
    if code is None:
        return None
    if isinstance(code, float) and code.is_integer():
        code = int(code)
    text = str(code).strip()
    # The code becomes a label value: keep it short and plain.
    return text[:16] if text.isascii() and text.isdigit() else "invalid"


def add(reports: Reports, status: object, cost: object, stop: object, date: object) -> None:
    """One recipient's raw fields, coerced, into ``reports``."""
    reports.add(status_text(status), _cost(cost), _unsubscribes(stop), _date(date))


def _unsubscribes(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return value is True or (type(value) in (int, float) and value == 1)


def status_text(value: object) -> str:
    """A raw status as its label value: trimmed, cut to ``MAX_STATUS_LENGTH``, never empty."""
    if isinstance(value, str):
        return value.strip()[:MAX_STATUS_LENGTH] or MISSING_STATUS
    if value is None:
        return MISSING_STATUS
    if value is NESTED or isinstance(value, bool):
        raise InvalidResponse("a recipient's status is not a string")
    return str(value)


def _cost(value: object) -> float:
    if value is None:
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        cost = float(value)
    elif isinstance(value, str):
        try:
            cost = float(value)
        except ValueError:
            raise InvalidResponse(f"a recipient's cost is not a number: {short(value)}") from None
    else:
        raise InvalidResponse("a recipient's cost is not a number")
    if not math.isfinite(cost):
        raise InvalidResponse("a recipient's cost is not finite")
    return cost


def _date(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        date = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return date if math.isfinite(date) and date > 0 else None


def short(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 80 else text[:77] + "..."
