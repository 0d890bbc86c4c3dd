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
_OPENERS = frozenset({"start_map", "start_array"})
_CLOSERS = frozenset({"end_map", "end_array"})
# Real documents are four levels deep; deeper values inside a report are ignored.
MAX_DEPTH = 32
# Longest raw status kept; it becomes a label value.
MAX_STATUS_LENGTH = 64
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
    walk = _JsonWalk(aggregator)
    try:
        for event, value in ijson.basic_parse(_BomStripped(body), use_float=True):
            if event == "map_key":
                walk.key(value)
            elif event in _OPENERS:
                walk.open(event)
            elif event in _CLOSERS:
                walk.close()
            else:
                walk.scalar(event, value)
    except (ijson.JSONError, UnicodeDecodeError) as e:
        raise InvalidResponse(f"malformed JSON: {_short(e)}") from None
    top = walk.top
    _check_envelope(top.get("success"), top.get("code"), top.get("message"), walk.saw_list)


class _JsonWalk:
    """Where a walk over ijson's events stands: depth 1 is the envelope, 2 the list,
    3 a report, 4 and deeper a value nested inside a report (ignored).

    It tracks depth itself rather than using ijson's prefixes, which cost memory
    quadratic in the nesting of a hostile body.
    """

    def __init__(self, aggregator: ReportAggregator) -> None:
        self.aggregator = aggregator
        self.top: dict[str, Any] = {}
        self.record: dict[str, Any] | None = None
        self.depth = 0
        self.top_key = self.field = ""
        self.in_list = self.saw_list = False

    def key(self, name: str) -> None:
        if self.depth == 1:
            self.top_key = name
        else:
            self.field = name

    def open(self, event: str) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise InvalidResponse(f"JSON nested deeper than {MAX_DEPTH} levels")
        if self.depth == 1 and event != "start_map":
            raise InvalidResponse("body is not a JSON object")
        if self.depth == 2 and self.top_key == _LIST:
            if event != "start_array":
                raise InvalidResponse(f"{_LIST} is not a list")
            if self.saw_list:
                raise InvalidResponse(f"{_LIST} appears twice")
            self.in_list = self.saw_list = True
        elif self.depth == 3 and self.in_list:
            if event != "start_map":
                raise InvalidResponse(f"{_LIST} holds an array, not a report object")
            self.record = {}
        elif self.depth == 4 and self.record is not None:
            self.record[self.field] = _NESTED

    def close(self) -> None:
        self.depth -= 1
        if self.depth == 2 and self.record is not None:
            record = self.record
            _add(
                self.aggregator,
                record.get("status"),
                record.get("cost"),
                record.get("stopMail"),
                record.get("date"),
            )
            self.record = None
        elif self.depth == 1:
            self.in_list = False

    def scalar(self, event: str, value: object) -> None:
        if self.depth == 3 and self.record is not None:
            self.record[self.field] = value
        elif self.depth == 1:
            if self.top_key == _LIST:
                raise InvalidResponse(f"{_LIST} is not a list")
            if self.top_key in _TOP_FIELDS:
                self.top[self.top_key] = value
        elif self.depth == 2 and self.in_list:
            raise InvalidResponse(f"{_LIST} holds a {event}, not a report object")
        elif self.depth == 0:
            raise InvalidResponse("body is not a JSON object")


class _BomStripped:
    """Drops a UTF-8 byte order mark, which yajl refuses, from the start of a body."""

    def __init__(self, body: Body) -> None:
        self._body = body
        self._first = True

    def read(self, size: int = -1, /) -> bytes:
        chunk = self._body.read(size)
        if self._first and chunk:  # ijson first calls read(0) to sniff the type
            self._first = False
            return chunk.removeprefix(b"\xef\xbb\xbf")
        return chunk


def parse_xml(body: Body, aggregator: ReportAggregator) -> None:
    """Stream the keyless ``<result><entry>…`` form into ``aggregator``.

    Entries are positional: success, code, messageId (or the error message),
    then a list entry holding one entry per recipient with six entries each:
    email, token, status, cost, stopMail, date.
    """
    top: list[str] = []
    reports: ET.Element | None = None
    depth = 0
    try:
        # expat (>= 2.4.1, bundled with Python 3.11) refuses entity-expansion
        # bombs, and ElementTree never fetches external entities.
        for event, element in ET.iterparse(body, events=("start", "end")):  # noqa: S314
            if event == "start":
                depth += 1
                if depth > MAX_DEPTH:
                    raise InvalidResponse(f"XML nested deeper than {MAX_DEPTH} levels")
                if depth == 1 and element.tag != "result":
                    raise InvalidResponse(f"XML root is <{element.tag}>, not <result>")
                if depth == 2 and len(top) == 3:
                    reports = element
                continue
            depth -= 1
            if depth == 2 and reports is not None:
                fields = [(child.text or "").strip() for child in element]
                if len(fields) != 6 or len(element.findall("./*/*")):
                    raise InvalidResponse("an XML recipient entry does not hold six values")
                _add(aggregator, fields[2] or None, fields[3] or None, fields[4], fields[5])
                reports.clear()  # done with it: the tree must not grow with the send
            elif depth == 1:
                top.append((element.text or "").strip())
                element.clear()
    except ET.ParseError as e:
        raise InvalidResponse(f"malformed XML: {e}") from None
    except (ValueError, LookupError) as e:  # an encoding expat cannot read
        raise InvalidResponse(f"unsupported XML encoding: {_short(e)}") from None
    if not top:
        raise InvalidResponse("XML body holds no entries")
    success = {"true": True, "false": False}.get(top[0].lower(), top[0])
    code = top[1] if len(top) > 1 else None
    message = top[2] if len(top) > 2 and not success else None
    _check_envelope(success, code, message, success is True and len(top) == 4)


def _check_envelope(success: object, code: object, message: object, saw_list: bool) -> None:
    code_text = error_code(code)
    if success is True and code_text in (None, "200"):
        if not saw_list:
            raise InvalidResponse(f"success without a {_LIST}")
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


def _add(
    aggregator: ReportAggregator, status: object, cost: object, stop_mail: object, date: object
) -> None:
    aggregator.add(_status(status), _cost(cost), _stop_mail(stop_mail), _date(date))


def _stop_mail(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return value is True or (type(value) in (int, float) and value == 1)


def _status(value: object) -> str:
    if isinstance(value, str):
        return value.strip()[:MAX_STATUS_LENGTH] or MISSING_STATUS
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
