"""The JSON fast path: plain reports matched and counted a chunk at a time.

The walker over yajl's events (``exporter.parse.walk``) reads the envelope up to the report
list; from there, reports in the documented shape (the shape's report keys in order, plain
values; compact, or with JSON whitespace) are matched a 64 KiB chunk at a time by a regular
expression and counted in bulk, with no object per report. At the first thing that is not
such a report (the end of the list, or anything odd), a new yajl parser is put where the
first one would be and the walker reads on, in the same chunks. So every outcome, down to
the error message, is the walker's own, and memory stays bounded by the chunk size.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice, pairwise, repeat
from typing import Any

import ijson

from exporter.aggregate import ReportAggregator
from exporter.parse.report import Body, InvalidResponse, status_text
from exporter.parse.shape import MAIL, ReportShape
from exporter.parse.walk import Chained, JsonWalk, WalkerBody, parse_json_exact, walk_events


def parse_json(body: Body, aggregator: ReportAggregator, shape: ReportShape = MAIL) -> None:
    """Stream a JSON bulk-status body of ``shape`` into ``aggregator``; raise on errors."""
    _FastJson(body, aggregator, shape).run()


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
        self._source = WalkerBody(body)
        self._aggregator = aggregator
        self._shape = shape
        self._fast = _fast_patterns(shape)
        self._walk = JsonWalk(_RefuseReports(), shape)
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
                walk_events(events, self._walk)
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
        parse_json_exact(Chained(self._chunks, self._source), self._aggregator, self._shape)

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
        events = ijson.basic_parse(Chained([prefix, *pieces], self._source), use_float=True)
        walk_events(islice(events, skip, None), self._walk)
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
        newest = _newest(digits) if digits else 0
        if newest is None:
            return False
        self._aggregator.add_many(
            self._named(Counter(statuses)),
            values,
            unsubscribed,
            float(newest) if newest > 0 else None,
        )
        if digits and self._aggregator.counts_delays:
            self._delivered(statuses, dates)
        self._reports += len(statuses)
        self._chunks = None
        return True

    def _named(self, literals: Counter[bytes]) -> dict[str, int]:
        """Counts by raw status literal to counts by status, in order of first sight."""
        named: dict[str, int] = {}
        for literal, count in literals.items():
            name = self._name(literal)
            named[name] = named.get(name, 0) + count
        return named

    def _name(self, literal: bytes) -> str:
        name = self._names.get(literal)
        if name is None:
            name = status_text(None if literal == b"null" else literal[1:-1].decode())
            if len(self._names) < _MAX_NAMES:
                self._names[literal] = name
        return name

    def _delivered(self, statuses: list[bytes], dates: list[bytes | None]) -> None:
        """The delivered reports' dates, counted by date, for the delay histogram."""
        aggregator = self._aggregator
        delivered = {s for s in set(statuses) if aggregator.delivered(self._name(s))}
        if delivered:
            when = Counter(d for s, d in zip(statuses, dates, strict=True) if d and s in delivered)
            aggregator.add_delivered({float(d): n for d, n in when.items() if int(d) > 0})


def _newest(digits: list[bytes]) -> int | None:
    """The greatest of some dates' digits; None if one is too long to be a plain date."""
    longest = max(map(len, digits))
    if longest > _MAX_DATE_DIGITS:
        return None
    top = max(digits)
    # Without leading zeros the greatest is among the longest, where text and number agree.
    if len(top) == longest and min(digits)[:1] != b"0":
        return int(top)
    return max(map(int, digits))
