"""Bulk-status bodies (JSON or the keyless XML form) streamed into a ``ReportAggregator``.

Both parsers read the body incrementally and hand each recipient to the
aggregator as soon as it is complete, so memory does not grow with the send.

Coercions, so one odd field does not throw away a whole message:
- ``status``: a string as received; missing or null is ``none``; numbers become text.
- ``cost``: a number or numeric string; missing or null is 0; anything else is invalid.
- ``stopMail``: true, or the strings ``true``/``1``, or the number 1; anything else is false.
- ``date``: epoch seconds as a string or number; anything else is ignored.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from typing import Any, Protocol

import ijson

from exporter.aggregate import ReportAggregator

_LIST = "StatutResponseList"
_ITEM = f"{_LIST}.item"
_FIELD = f"{_ITEM}."
_SCALARS = frozenset({"string", "number", "boolean", "null"})
_TOP_FIELDS = frozenset({"success", "code", "message", "messageId"})
_NESTED = object()
MISSING_STATUS = "none"


class Body(Protocol):
    """What the parsers read from: a response body, or bytes in tests."""

    def read(self, size: int = -1, /) -> bytes: ...


class InvalidResponse(Exception):
    """The body is not a bulk-status document."""


class UpstreamError(Exception):
    """A well-formed error document: ``success`` false with a ``code``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"code {code}: {message}" if message else f"code {code}")


def parse_json(body: Body, aggregator: ReportAggregator) -> None:
    """Stream a JSON bulk-status body into ``aggregator``; raise on errors."""
    top: dict[str, Any] = {}
    record: dict[str, Any] | None = None
    saw_list = False
    try:
        for prefix, event, value in ijson.parse(body, use_float=True):
            if record is not None and prefix.startswith(_FIELD):
                name = prefix[len(_FIELD) :]
                if "." not in name:
                    record[name] = value if event in _SCALARS else _NESTED
            elif prefix == _ITEM:
                if event == "start_map":
                    record = {}
                elif event == "end_map" and record is not None:
                    _add(
                        aggregator,
                        record.get("status"),
                        record.get("cost"),
                        record.get("stopMail"),
                        record.get("date"),
                    )
                    record = None
                elif event != "map_key":
                    raise InvalidResponse(
                        f"{_LIST} holds a {event.removeprefix('start_')}, not a report object"
                    )
            elif prefix == _LIST:
                if event not in ("start_array", "end_array"):
                    raise InvalidResponse(f"{_LIST} is not a list")
                saw_list = True
            elif prefix == "" and event not in ("start_map", "end_map", "map_key"):
                raise InvalidResponse("body is not a JSON object")
            elif prefix in _TOP_FIELDS and event in _SCALARS:
                top[prefix] = value
    except ijson.JSONError as e:
        raise InvalidResponse(f"malformed JSON: {_short(e)}") from None
    _check_envelope(top.get("success"), top.get("code"), top.get("message"), saw_list)


def parse_xml(body: Body, aggregator: ReportAggregator) -> None:
    """Stream the keyless ``<result><entry>…`` form into ``aggregator``.

    Entries are positional: success, code, messageId (or the error message),
    then a list entry holding one entry per recipient with six entries each:
    email, token, status, cost, stopMail, date.
    """
    top: list[str] = []
    saw_list = False
    depth = 0
    try:
        # expat (>= 2.4.1, bundled with Python 3.11) refuses entity-expansion
        # bombs, and ElementTree never fetches external entities.
        for event, element in ET.iterparse(body, events=("start", "end")):  # noqa: S314
            if event == "start":
                depth += 1
                if depth == 1 and element.tag != "result":
                    raise InvalidResponse(f"XML root is <{element.tag}>, not <result>")
                if depth == 3 and len(top) == 3:
                    saw_list = True
                continue
            depth -= 1
            if depth == 2 and saw_list:
                fields = [(child.text or "").strip() for child in element]
                if len(fields) != 6 or len(element.findall("./*/*")):
                    raise InvalidResponse("an XML recipient entry does not hold six values")
                _add(aggregator, fields[2] or None, fields[3] or None, fields[4], fields[5])
                element.clear()
            elif depth == 1:
                top.append((element.text or "").strip())
                element.clear()
    except ET.ParseError as e:
        raise InvalidResponse(f"malformed XML: {e}") from None
    if not top:
        raise InvalidResponse("XML body holds no entries")
    success = {"true": True, "false": False}.get(top[0].lower(), top[0])
    code = top[1] if len(top) > 1 else None
    message = top[2] if len(top) > 2 and not success else None
    _check_envelope(success, code, message, saw_list or (success is True and len(top) == 4))


def _check_envelope(success: object, code: object, message: object, saw_list: bool) -> None:
    code_text = _code(code)
    if success is True and code_text in (None, "200"):
        if not saw_list:
            raise InvalidResponse(f"success without a {_LIST}")
        return
    if code_text is None or code_text == "200":
        raise InvalidResponse(f"success is {success!r} with code {code_text}")
    raise UpstreamError(code_text, message if isinstance(message, str) else "")


def _code(code: object) -> str | None:
    if code is None:
        return None
    if isinstance(code, float) and code.is_integer():
        code = int(code)
    text = str(code).strip()
    # The code becomes a label value: keep it short and plain.
    return text[:16] if text.isdigit() else "invalid"


def _add(
    aggregator: ReportAggregator, status: object, cost: object, stop_mail: object, date: object
) -> None:
    aggregator.add(_status(status), _cost(cost), stop_mail in _TRUE, _date(date))


_TRUE = (True, "true", "True", "1", 1)


def _status(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return MISSING_STATUS
    if value is _NESTED or isinstance(value, bool):
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
            raise InvalidResponse(f"a recipient's cost is not a number: {_short(value)}") from None
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


def _short(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 80 else text[:77] + "..."
