"""Bulk-status bodies (JSON or the keyless XML form) streamed into a ``ReportAggregator``.

Both parsers read the body incrementally and hand each recipient to the
aggregator as soon as it is complete, so memory does not grow with the send.

Mail Partner and SMS Partner write the same document under different names: a
``ReportShape`` says which (``MAIL``, the default, or ``SMS``).

JSON takes a fast path for the usual shape. The walker over yajl's events reads the
envelope up to the report list; from there, reports in the documented shape (the shape's
report keys in order, plain values; compact, or with JSON whitespace) are matched a
64 KiB chunk at a time by a regular expression and counted in bulk, with no object per
report. At the first thing that is not such a report (the end of the list, or anything
odd), a new yajl parser is put where the first one would be and the walker reads on, in
the same chunks. So every outcome, down to the error message, is the walker's own, and
memory stays bounded by the chunk size.

Coercions, so one odd field does not throw away a whole message:
- ``status``: a string as received; missing or null is ``none``; numbers become text.
- ``cost``: a number or numeric string; missing or null is 0; anything else is invalid.
- the unsubscribe flag (``stopMail``, ``stopSMS``): true, or the strings ``true``/``1``, or
  the number 1; anything else is false. Only the shape's own flag counts.
- ``date``: epoch seconds as a string or number; anything else is ignored.
"""

from __future__ import annotations

import functools
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice, pairwise, repeat
from typing import Any, Protocol

import ijson

from exporter.aggregate import ReportAggregator

_OPENERS = frozenset({"start_map", "start_array"})
_CLOSERS = frozenset({"end_map", "end_array"})
# Real documents are four levels deep; deeper values inside a report are ignored.
MAX_DEPTH = 32
# Longest raw status kept; it becomes a label value.
MAX_STATUS_LENGTH = 64
_TOP_FIELDS = frozenset({"success", "code", "message", "messageId"})
_NESTED = object()
MISSING_STATUS = "none"


@dataclass(frozen=True)
class ReportShape:
    """The names one API gives its bulk-status document: the report list's key, the
    unsubscribe flag's key, and a report's keys in the order the API writes them, ``cost``
    left out or not if ``cost_optional``. That order is what the JSON fast path matches
    and where the keyless XML form puts each value; it holds ``status``, the flag and
    ``date``, and may hold ``cost`` (neither first nor last)."""

    list_key: str
    stop_key: str
    report_keys: tuple[str, ...]
    cost_optional: bool = False

    def __post_init__(self) -> None:
        # The keys are written into the fast path's patterns as they are.
        for name in (self.list_key, *self.report_keys):
            if not name.isprintable() or not name or '"' in name or "\\" in name:
                raise ValueError(f"unusable key {name!r}")
        keys = self.report_keys
        if len(set(keys)) != len(keys) or self.stop_key in ("status", "cost", "date"):
            raise ValueError("report keys must be distinct")
        if not {"status", self.stop_key, "date"} <= set(keys):
            raise ValueError(f"report keys must hold status, {self.stop_key} and date")
        if "cost" in (keys[0], keys[-1]):
            raise ValueError("cost must be neither the first nor the last report key")
        if self.cost_optional and "cost" not in keys:
            raise ValueError("an optional cost must have its place among the report keys")

    @property
    def layouts(self) -> tuple[tuple[str, ...], ...]:
        """The key orders a report comes in: all the keys, then without cost if optional."""
        if not self.cost_optional:
            return (self.report_keys,)
        return self.report_keys, tuple(key for key in self.report_keys if key != "cost")


MAIL = ReportShape(
    "StatutResponseList", "stopMail", ("email", "token", "status", "cost", "stopMail", "date")
)
# SMS Partner's documented example has no cost; the simulator writes it where Mail's is.
SMS = ReportShape(
    "StatutResponse_List",
    "stopSMS",
    ("phoneNumber", "status", "cost", "stopSMS", "date"),
    cost_optional=True,
)


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


def parse_json(body: Body, aggregator: ReportAggregator, shape: ReportShape = MAIL) -> None:
    """Stream a JSON bulk-status body of ``shape`` into ``aggregator``; raise on errors."""
    _FastJson(body, aggregator, shape).run()


def _parse_exact(body: Body, aggregator: _Reports, shape: ReportShape) -> None:
    walk = _JsonWalk(aggregator, shape)
    _walk(ijson.basic_parse(body, use_float=True), walk)
    walk.check_envelope()


def _walk(events: Iterable[tuple[str, Any]], walk: _JsonWalk) -> None:
    try:
        for event, value in events:
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


class _Reports(Protocol):
    def add(self, status: str, cost: float, stop_mail: bool, date: float | None) -> None: ...


class _JsonWalk:
    """Where a walk over ijson's events stands: depth 1 is the envelope, 2 the list,
    3 a report, 4 and deeper a value nested inside a report (ignored).

    It tracks depth itself rather than using ijson's prefixes, which cost memory
    quadratic in the nesting of a hostile body.
    """

    def __init__(self, aggregator: _Reports, shape: ReportShape) -> None:
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
            self.record[self.field] = _NESTED

    def close(self) -> None:
        self.depth -= 1
        if self.depth == 2 and self.record is not None:
            record = self.record
            _add(
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
            if self.top_key in _TOP_FIELDS:
                self.top[self.top_key] = value
        elif self.depth == 2 and self.in_list:
            raise InvalidResponse(f"{self.list_key} holds a {event}, not a report object")
        elif self.depth == 0:
            raise InvalidResponse("body is not a JSON object")

    def check_envelope(self) -> None:
        """Raise unless the walked body was a successful document with a report list."""
        top = self.top
        _check_envelope(
            top.get("success"), top.get("code"), top.get("message"), self.saw_list, self.list_key
        )


# ---------------------------------------------------------------- the JSON fast path

# ijson's read size: the fast path reads the same chunks, so that when the walker takes
# over, yajl gets the buffers it would have had (its error messages quote them).
_CHUNK = 64 * 1024
# An unfinished plain report longer than this is not plain.
_MAX_CARRY = 16 * 1024
# How far the report list is looked for before the walker takes the whole body.
_MAX_ENVELOPE = 1024 * 1024
_WS = rb"[ \t\n\r]*+"
_NUMBER = rb"-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,17})?(?:[eE][-+]?[0-9]{1,2})?"
# A plain report's values by what they hold, with JSON whitespace between its tokens.
# Strings are those yajl reads as they are (no unicode escapes, no control characters; no
# escapes at all in the status, whose bytes are its text); numbers stay far from int64 and
# float overflow, so yajl reads the value float() reads. Groups: status (with its quotes,
# or null), cost, the unsubscribe flag, date (digits without leading zeros, None for ""
# or null).
_SPACED_VALUES = {
    "text": rb'"[^"\\\x00-\x1f]*+(?:\\["\\/bfnrt][^"\\\x00-\x1f]*+)*+"',
    "status": rb'("[^"\\\x00-\x1f]*+"|null)',
    "cost": b"(" + _NUMBER + b"|null)",
    "stop": rb"(true|false|null)",
    "date": rb'(?:"(0|[1-9][0-9]{0,14}+)?"|null)',
}
# A compact plain report, as the APIs and the simulator write them, in a chunk free of
# control characters and backslashes (checked beforehand with _NOT_COMPACT), its cost
# and date loosely: all quicker than the spaced pattern. Groups: status, date (digits,
# None for null). The costs and dates are checked, and the flag counted, from the text.
_COMPACT_VALUES = {
    "text": rb'"[^"]*+"',
    "status": rb'("[^"]*+"|null)',
    "cost": rb"[^,]{1,40}+",
    "stop": rb"(?:true|false|null)",
    "date": rb'(?:"([^"]*+)"|null)',
}
_NOT_COMPACT = bytes(int(byte < 0x20 or byte == 0x5C) for byte in range(256))
_COST = re.compile(rb',"cost":([^,]*+),')
_PLAIN_COST = re.compile(_NUMBER + b"|null")
_MAX_DATE_DIGITS = 15  # well past any date, and within a float's exact integers
_BLANK = b" \t\n\r"
_BOM = b"\xef\xbb\xbf"
# Raw status literals remembered with their status, per body.
_MAX_NAMES = 256


@dataclass(frozen=True)
class _Plain:
    """One way plain reports are written: the first report's pattern, the pattern of each
    next one after its comma, and where each report's groups are in a split of it."""

    first: re.Pattern[bytes]
    following: re.Pattern[bytes]
    compact: bool
    at: Mapping[str, int]
    costed: bool  # a compact report's cost is read with _COST
    events: int  # yajl's events for a plain report: start, each key and value, end


@dataclass(frozen=True)
class _FastPatterns:
    """A shape's fast path."""

    plains: tuple[_Plain, ...]  # the compact ones first: they are the quicker
    stopped: bytes  # a compact report's flag when it is true
    list_start: re.Pattern[bytes]
    # What puts a new yajl parser in the report list, before its first value (three
    # events) or after one (five; the empty report is not the walker's to see).
    inside_list: bytes


@functools.cache
def _fast_patterns(shape: ReportShape) -> _FastPatterns:
    named = {"status": "status", "cost": "cost", shape.stop_key: "stop", "date": "date"}

    def plain(keys: tuple[str, ...], compact: bool) -> _Plain:
        members = [(re.escape(key.encode()), named.get(key, "text")) for key in keys]
        values, space = (_COMPACT_VALUES, b"") if compact else (_SPACED_VALUES, _WS)
        body = b",".join(
            space + b'"' + key + b'"' + space + b":" + space + values[held] + space
            for key, held in members
        )
        report = space + rb"\{" + body + rb"\}"
        grouped = ("status", "date") if compact else ("status", "cost", "stop", "date")
        held = [held for _, held in members if held in grouped]
        return _Plain(
            first=re.compile(report),
            following=re.compile(b"," + report),
            compact=compact,
            at={name: number for number, name in enumerate(held, 1)},
            costed="cost" in keys,
            events=2 + 2 * len(keys),
        )

    list_key = shape.list_key.encode()
    return _FastPatterns(
        plains=tuple(plain(keys, compact) for compact in (True, False) for keys in shape.layouts),
        stopped=b'"' + shape.stop_key.encode() + b'":true',
        list_start=re.compile(rb'"' + re.escape(list_key) + rb'"' + _WS + b":" + _WS + rb"\["),
        inside_list=b'{"' + list_key + b'":[',
    )


class _Unusual(Exception):
    """What the fast path does not handle: the walker reads the body from the start."""


class _Source:
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


class _Chained:
    """Some chunks already read, then the rest of the body, as ijson reads them."""

    def __init__(self, pieces: Iterable[bytes], rest: Body) -> None:
        self._pieces = deque(piece for piece in pieces if piece)
        self._rest = rest

    def read(self, size: int = -1, /) -> bytes:
        if size == 0:  # ijson's sniff; the body has had its own
            return b""
        if self._pieces:
            return self._pieces.popleft()
        return self._rest.read(size)


class _RefuseReports:
    """The walker's aggregator while it reads the envelope: a report there is unusual."""

    def add(self, status: str, cost: float, stop_mail: bool, date: float | None) -> None:
        raise _Unusual


class _FastJson:
    """Plain reports matched and counted a chunk at a time; the walker reads the rest.

    The walker reads the envelope up to the list, then hands over to the fast path,
    which hands back at the first thing that is not a plain report: the end of the list,
    or whatever else. A new yajl parser is put where the old one would be by a prefix
    and the last plain report, whose events the walker skips, then reads on from there,
    in the chunks that were read. So the walker gives the outcome, and even the message,
    it would have given alone.
    """

    def __init__(self, body: Body, aggregator: ReportAggregator, shape: ReportShape) -> None:
        self._source = _Source(body)
        self._aggregator = aggregator
        self._shape = shape
        self._fast = _fast_patterns(shape)
        self._walk = _JsonWalk(_RefuseReports(), shape)
        self._chunks: list[bytes] | None = []  # all read, until a report is counted
        self._starts: list[int] = []  # offsets where recent chunks start
        self._read = 0  # offset of the end of what was read
        self._at = 0  # offset of the data being matched
        self._last = b""  # the last plain report, which ends at ``_at``
        self._reports = 0
        self._plain = self._fast.plains[0]  # until the first report says otherwise
        self._names: dict[bytes, str] = {}

    def run(self) -> None:
        self._source.read(0)  # as ijson does first
        data = self._envelope()
        if data is None:
            return
        while True:
            data = self._plain_reports(data)
            if len(data) > _MAX_CARRY or data.lstrip(_BLANK).startswith(b"]"):
                break
            chunk = self._next()
            if not chunk:
                break
            data += chunk
        self._walk_on(data)

    def _next(self) -> bytes:
        try:
            chunk = self._source.read(_CHUNK)
        except Exception:  # raised again when the walker reads on
            return b""
        if self._chunks is not None:
            self._chunks.append(chunk)
        self._starts.append(self._read)
        self._read += len(chunk)
        return chunk

    def _envelope(self) -> bytes | None:
        """Walk the envelope up to the report list's ``[``; what follows it, or None if
        the walker alone has read the body."""
        head = b""
        while (found := self._fast.list_start.search(head)) is None and len(head) <= _MAX_ENVELOPE:
            chunk = self._next()
            if not chunk:
                break
            head += chunk
        if found is not None:
            events = ijson.sendable_list()
            try:
                ijson.basic_parse_coro(events, use_float=True).send(head[: found.end()])
                _walk(events, self._walk)
            except (ijson.JSONError, UnicodeDecodeError, InvalidResponse, _Unusual):
                pass
            else:
                if self._walk.in_list and self._walk.depth == 2:  # the top-level list
                    self._walk.aggregator = self._aggregator
                    self._at = found.end()
                    return head[found.end() :]
        self._from_start()
        return None

    def _from_start(self) -> None:
        assert self._chunks is not None  # kept until a report is counted
        _parse_exact(_Chained(self._chunks, self._source), self._aggregator, self._shape)

    def _walk_on(self, data: bytes) -> None:
        """The walker reads from the end of the last plain report on."""
        if not self._reports:
            self._from_start()
            return
        stream = self._last + data
        at = self._at - len(self._last)
        cuts = [start - at for start in self._starts if at < start < at + len(stream)]
        pieces = [stream[a:b] for a, b in pairwise([0, *cuts, len(stream)])]
        inside = self._fast.inside_list
        prefix = inside + b"{}" if self._reports > 1 else inside
        skip = (5 if self._reports > 1 else 3) + self._plain.events
        events = ijson.basic_parse(_Chained([prefix, *pieces], self._source), use_float=True)
        _walk(islice(events, skip, None), self._walk)
        self._walk.check_envelope()

    def _plain_reports(self, data: bytes) -> bytes:
        """Count the plain reports ``data`` starts with; what follows them."""
        view = data
        if self._plain.compact or not self._reports:
            bad = data.translate(_NOT_COMPACT).find(1)
            view = data if bad < 0 else data[:bad]
        start, parts = 0, []
        if not self._reports:
            found = self._first_report(data, view)
            if found is None:
                return data
            self._plain, first = found
            if not self._plain.compact:
                view = data
            start, parts = first.end(), [b"", *first.groups()]
        following = self._plain.following
        work = view[start:] if start else view
        more = following.split(work)
        end = len(work) - len(more[-1])
        period = following.groups + 1  # a split gives the text before a report, then its groups
        if len(more) > 1 and any(more[0:-1:period]):  # a gap: not all are plain
            end = 0
            for match in following.finditer(work):
                if match.start() != end:
                    break
                end = match.end()
            more = following.split(work[:end])
        stop = start + end
        if not stop:
            return data
        if not data.isascii():
            try:
                data[:stop].decode()
            except UnicodeDecodeError:
                return data
        if not self._count(data, stop, parts + more if parts else more, period):
            return data
        # Where the last report starts: the last comma from which one matches.
        last = start + work.rfind(b",", 0, end) if end else 0
        while last > start and not following.fullmatch(data, last, stop):
            last = start + work.rfind(b",", 0, last - start)
        self._last = data[max(last, 0) : stop]
        self._at += stop
        self._starts = [offset for offset in self._starts if offset > self._at - len(self._last)]
        return data[stop:]

    def _first_report(self, data: bytes, view: bytes) -> tuple[_Plain, re.Match[bytes]] | None:
        """How the first report is written, and its match; compact reports are looked for
        in ``view``, ``data`` cut at its first control character or backslash."""
        for plain in self._fast.plains:
            first = plain.first.match(view if plain.compact else data)
            if first is not None:
                return plain, first
        return None

    def _count(self, data: bytes, stop: int, parts: list[Any], period: int) -> bool:
        """Add the reports ``data[:stop]`` holds, whose groups are ``parts``; False, adding
        nothing, if a compact one's cost or date is not plain after all."""
        plain = self._plain
        at = plain.at
        statuses: list[bytes] = parts[at["status"] :: period]
        dates: list[bytes | None] = parts[at["date"] :: period]
        digits: list[bytes] = list(filter(None, dates))
        costs: list[bytes] = []
        same = False
        if plain.compact:
            # Only the flag's key can be followed by a colon and true: a compact report's
            # strings hold no quotes.
            unsubscribed = data.count(self._fast.stopped, 0, stop)
            if plain.costed:
                first = _COST.search(data, 0, stop)
                assert first is not None
                same = data.count(b',"cost":' + first[1] + b",", 0, stop) == len(statuses)
                costs = [first[1]] if same else _COST.findall(data, 0, stop)
                if not all(map(_PLAIN_COST.fullmatch, set(costs))):
                    return False
            if digits and not b"".join(digits).isdigit():
                return False
        else:
            unsubscribed = parts[at["stop"] :: period].count(b"true")
            if plain.costed:
                costs = parts[at["cost"] :: period]
        if b"null" in costs:  # 0: adding it changes nothing
            costs = [cost for cost in costs if cost != b"null"]
        values: Iterable[float] = map(float, costs)
        if same and costs:  # one price: read it once
            values = repeat(float(costs[0]), len(statuses))
        newest = 0
        if digits:
            longest = max(map(len, digits))
            if longest > _MAX_DATE_DIGITS:
                return False
            top = max(digits)
            # Without leading zeros the greatest is among the longest, where text and
            # number order agree.
            if len(top) == longest and min(digits)[:1] != b"0":
                newest = int(top)
            else:
                newest = max(map(int, digits))
        self._aggregator.add_many(
            self._named(Counter(statuses)),
            values,
            unsubscribed,
            float(newest) if newest > 0 else None,
        )
        self._reports += len(statuses)
        self._chunks = None
        return True

    def _named(self, literals: Counter[bytes]) -> dict[str, int]:
        """Counts by raw status literal to counts by status, in order of first sight."""
        named: dict[str, int] = {}
        for literal, count in literals.items():
            name = self._names.get(literal)
            if name is None:
                name = _status(None if literal == b"null" else literal[1:-1].decode())
                if len(self._names) < _MAX_NAMES:
                    self._names[literal] = name
            named[name] = named.get(name, 0) + count
        return named


def parse_xml(body: Body, aggregator: ReportAggregator, shape: ReportShape = MAIL) -> None:
    """Stream the keyless ``<result><entry>…`` form into ``aggregator``.

    Entries are positional: success, code, messageId (or the error message),
    then a list entry holding one entry per recipient, which holds one entry per report
    key of ``shape``, in order (Mail Partner: email, token, status, cost, stopMail, date).
    Every element is an ``<entry>``: shapes differ only in the positions, and an optional
    cost is told by the number of values.
    """
    places = {len(keys): _places(keys, shape.stop_key) for keys in shape.layouts}
    widths = " or ".join(map(_in_words, sorted(places)))
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
                place = places.get(len(fields))
                if place is None or len(element.findall("./*/*")):
                    raise InvalidResponse(f"an XML recipient entry does not hold {widths} values")
                status_at, cost_at, stop_at, date_at = place
                cost = None if cost_at is None else fields[cost_at] or None
                _add(aggregator, fields[status_at] or None, cost, fields[stop_at], fields[date_at])
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
    _check_envelope(success, code, message, success is True and len(top) == 4, shape.list_key)


def _places(keys: tuple[str, ...], stop_key: str) -> tuple[int, int | None, int, int]:
    """Where status, cost (None if left out), the flag and date are among ``keys``."""
    cost = keys.index("cost") if "cost" in keys else None
    return keys.index("status"), cost, keys.index(stop_key), keys.index("date")


def _in_words(number: int) -> str:
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return words[number] if number < len(words) else str(number)


def _check_envelope(
    success: object, code: object, message: object, saw_list: bool, list_key: str
) -> None:
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


def _add(aggregator: _Reports, status: object, cost: object, stop: object, date: object) -> None:
    aggregator.add(_status(status), _cost(cost), _unsubscribes(stop), _date(date))


def _unsubscribes(value: object) -> bool:
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
