"""The exact JSON parser: a walk over yajl's events (ijson) that hands each recipient to the
aggregator as soon as it is complete, so memory does not grow with the send.

It is the reference for every outcome and error message; the fast path
(``exporter.parse.fast``) hands it whatever is not a plain report.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import ijson

from exporter.parse.report import (
    MAX_DEPTH,
    NESTED,
    Body,
    InvalidResponse,
    Reports,
    add,
    check_envelope,
    short,
)
from exporter.parse.shape import MAIL, ReportShape

OPENERS = frozenset({"start_map", "start_array"})
CLOSERS = frozenset({"end_map", "end_array"})
TOP_FIELDS = frozenset({"success", "code", "message", "messageId"})


def parse_json_exact(body: Body, aggregator: Reports, shape: ReportShape = MAIL) -> None:
    """Walk a JSON bulk-status body of ``shape`` event by event into ``aggregator``."""
    walk = JsonWalk(aggregator, shape)
    walk_events(ijson.basic_parse(body, use_float=True), walk)
    walk.check_envelope()


def walk_events(events: Iterable[tuple[str, Any]], walk: JsonWalk) -> None:
    try:
        for event, value in events:
            if event == "map_key":
                walk.key(value)
            elif event in OPENERS:
                walk.open(event)
            elif event in CLOSERS:
                walk.close()
            else:
                walk.scalar(event, value)
    except (ijson.JSONError, UnicodeDecodeError) as e:
        raise InvalidResponse(f"malformed JSON: {short(e)}") from None


class JsonWalk:
    """Where a walk over ijson's events stands: depth 1 is the envelope, 2 the list,
    3 a report, 4 and deeper a value nested inside a report (ignored).

    It tracks depth itself rather than using ijson's prefixes, which cost memory
    quadratic in the nesting of a hostile body.
    """

    def __init__(self, aggregator: Reports, shape: ReportShape) -> None:
        self.aggregator = aggregator
        self.list_key, self.stop_key = shape.list_key, shape.stop_key
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
        if self.depth == 2 and self.top_key == self.list_key:
            if event != "start_array":
                raise InvalidResponse(f"{self.list_key} is not a list")
            if self.saw_list:
                raise InvalidResponse(f"{self.list_key} appears twice")
            self.in_list = self.saw_list = True
        elif self.depth == 3 and self.in_list:
            if event != "start_map":
                raise InvalidResponse(f"{self.list_key} holds an array, not a report object")
            self.record = {}
        elif self.depth == 4 and self.record is not None:
            self.record[self.field] = NESTED

    def close(self) -> None:
        self.depth -= 1
        if self.depth == 2 and self.record is not None:
            record = self.record
            add(
                self.aggregator,
                record.get("status"),
                record.get("cost"),
                record.get(self.stop_key),
                record.get("date"),
            )
            self.record = None
        elif self.depth == 1:
            self.in_list = False

    def scalar(self, event: str, value: object) -> None:
        if self.depth == 3 and self.record is not None:
            self.record[self.field] = value
        elif self.depth == 1:
            if self.top_key == self.list_key:
                raise InvalidResponse(f"{self.list_key} is not a list")
            if self.top_key in TOP_FIELDS:
                self.top[self.top_key] = value
        elif self.depth == 2 and self.in_list:
            raise InvalidResponse(f"{self.list_key} holds a {event}, not a report object")
        elif self.depth == 0:
            raise InvalidResponse("body is not a JSON object")

    def check_envelope(self) -> None:
        """Raise unless the walked body was a successful document with a report list."""
        top = self.top
        check_envelope(
            top.get("success"), top.get("code"), top.get("message"), self.saw_list, self.list_key
        )


class Chained:
    """Some chunks already read, then the rest of the body, as ijson reads them: how the
    fast path hands the walker a body it has begun."""

    def __init__(self, pieces: Iterable[bytes], rest: Body) -> None:
        self._pieces = deque(piece for piece in pieces if piece)
        self._rest = rest

    def read(self, size: int = -1, /) -> bytes:
        if size == 0:  # ijson's sniff; the body has had its own
            return b""
        if self._pieces:
            return self._pieces.popleft()
        return self._rest.read(size)


# A UTF-8 byte order mark, which yajl does not skip.
_BOM = b"\xef\xbb\xbf"


class WalkerBody:
    """The body as the walker reads it: a UTF-8 BOM dropped from the first chunk, nothing
    after the end, and a failed read raised again by each later one, so that the walker
    meets it after what came before, as it would have."""

    def __init__(self, body: Body) -> None:
        self._body = body
        self._first = True
        self._ended = False
        self.failure: Exception | None = None

    def read(self, size: int = -1, /) -> bytes:
        if self.failure is not None:
            raise self.failure
        if self._ended:
            return b""
        try:
            chunk = self._body.read(size)
        except Exception as e:
            self.failure = e
            raise
        if self._first and chunk:
            chunk, self._first = chunk.removeprefix(_BOM), False
        self._ended = not chunk and size != 0  # read(0) is ijson's sniff
        return chunk
