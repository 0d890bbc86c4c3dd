"""``/metrics`` in the text format 0.0.4 or OpenMetrics 1.0, byte for byte what prometheus_client
writes in that format, fast.

Per-message families are rendered a message at a time and kept between scrapes, keyed on
the ``TrackedMessage`` object (replaced whole on every change) and then on the view of it
that its series depend on, so a poll that starts, or changes nothing, re-renders nothing.
The lines live joined in blocks of about ``CHUNK`` messages, one chunk per family: a scrape
sends the chunks as they are, rebuilds only blocks holding a changed message (from slices
of the old chunks) and deflates only those for gzip. Every other family (a few dozen
samples) goes through prometheus_client's own writer for the format. A gauge's sample lines
are the same bytes in both formats (the same label escaping and float formatting); only the
headers differ, and OpenMetrics ends with ``# EOF``. Label names are written as they are: the
configuration only accepts legacy names (``[a-zA-Z_][a-zA-Z0-9_]*``), which need no escaping.
"""

from __future__ import annotations

import struct
import threading
import weakref
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Generic, NamedTuple, TypeVar

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as _openmetrics_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from exporter.tracked import TrackedMessage

Samples = Sequence[tuple[Mapping[str, str], float]]
Row = tuple[bytes, ...]  # one message's lines, per family
View = TypeVar("View")
# Messages per block, on average: blocks end after messages whose ID hashes to 0 mod CHUNK,
# so a message coming or going changes no other block.
CHUNK = 128
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, no mtime, unknown OS
_LAST_BLOCK = b"\x03\x00"  # an empty final deflate block
_go_float: Callable[[float], str] = floatToGoString  # untyped in prometheus_client
_write_openmetrics: Callable[[Collector], bytes] = _openmetrics_latest  # untyped there too


class Chunk:
    """Some exposition bytes, and their deflate stream once gzip is asked for."""

    __slots__ = ("__weakref__", "_deflated", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._deflated: bytes | None = None

    def deflated(self, deflate: Callable[[bytes], bytes]) -> bytes:
        if self._deflated is None:
            self._deflated = deflate(self.raw)
        return self._deflated


class MessageLines(Generic[View]):
    """The rendered lines of every message's series, per family, kept between scrapes.

    ``families`` are (name, help) of gauges; ``samples(view(message))`` gives one list of
    (labels, value) per family, for the registry's samples and for the lines alike. A
    message's lines are kept once, inside its block's chunks.
    """

    def __init__(
        self,
        families: Sequence[tuple[str, str]],
        view: Callable[[TrackedMessage], View],
        samples: Callable[[View], Sequence[Samples]],
    ) -> None:
        self.families = tuple(families)
        self.view = view
        self.samples = samples
        self._headers = [Chunk(generate_latest(FixedMetrics([gauge(*f)]))) for f in families]
        self.openmetrics_headers = [Chunk(openmetrics([gauge(*f)])) for f in families]
        self._lock = threading.Lock()  # two scrapes at once update the caches in turn
        # By message ID: the message last seen, its view, and its lines (where in a block).
        self._lines: dict[str, tuple[TrackedMessage, View, Row | _Place]] = {}
        # By the ID of a block's first message: where its messages' lines are, and its chunks.
        self._blocks: dict[str, tuple[list[Row | _Place], list[Chunk]]] = {}
        self._last: tuple[Sequence[TrackedMessage], list[list[Chunk]]] = ((), [])

    def __len__(self) -> int:
        """How many messages have their lines kept."""
        return len(self._lines)

    def metrics(self, messages: Sequence[TrackedMessage]) -> list[Metric]:
        """One scrape's families over ``messages`` (in exposition order); nothing rendered yet."""
        scrape = _Scrape(self, messages)
        return [MessageFamily(scrape, i, *family) for i, family in enumerate(self.families)]

    def chunks(self, messages: Sequence[TrackedMessage]) -> list[list[Chunk]]:
        """Each family's header and lines in chunks, redoing only messages that changed."""
        with self._lock:
            if self._last[0] == messages:  # the same objects: a pointer check per message
                return self._last[1]
            kept, self._blocks = self._blocks, {}
            families = [[header] for header in self._headers]
            for entries in self._entries(messages):
                first = entries[0][0].spec.id
                rows = [lines for _, _, lines in entries]
                block = kept.get(first)
                if block is None or block[0] != rows:  # unchanged: the same places
                    joined = _Block(rows, len(self.families))
                    places: list[Row | _Place] = [_Place(joined, at) for at in range(len(rows))]
                    for (message, view, _), place in zip(entries, places, strict=True):
                        self._lines[message.spec.id] = (message, view, place)
                    block = (places, joined.chunks)
                self._blocks[first] = block
                for family, chunk in zip(families, block[1], strict=True):
                    family.append(chunk)
            if len(self._lines) > len(messages):  # messages gone: forget their lines
                current = {message.spec.id for message in messages}
                self._lines = {k: v for k, v in self._lines.items() if k in current}
            self._last = (messages, families)
            return families

    def _entries(
        self, messages: Sequence[TrackedMessage]
    ) -> Iterator[list[tuple[TrackedMessage, View, Row | _Place]]]:
        """Each message's entry, rendered again if its view changed, a block at a time."""
        kept = self._lines
        block = []
        for message in messages:
            message_id = message.spec.id
            entry = kept.get(message_id)
            if entry is None or entry[0] is not message:
                view = self.view(message)
                same = entry is not None and entry[1] == view
                lines = entry[2] if entry is not None and same else self._render(view)
                entry = kept[message_id] = (message, view, lines)
            block.append(entry)
            if hash(message_id) % CHUNK == 0:
                yield block
                block = []
        if block:
            yield block

    def _render(self, view: View) -> Row:
        pairs: dict[tuple[str, str], str] = {}
        return tuple(
            _lines(name, samples, pairs)
            for (name, _), samples in zip(self.families, self.samples(view), strict=True)
        )


class _Block:
    """Consecutive messages' lines joined into one chunk per family, with each message's
    length there: a chunk is rebuilt around a changed message from slices of the old one,
    without rendering the others again."""

    __slots__ = ("chunks", "lengths")

    def __init__(self, rows: Sequence[Row | _Place], families: int) -> None:
        self.chunks: list[Chunk] = []
        self.lengths: list[array[int]] = []
        runs = _runs(rows)
        for family in range(families):
            parts: list[bytes | memoryview] = []
            lengths = array("L")
            for run in runs:
                if isinstance(run, _Run):
                    old = run.block.lengths[family]
                    start = sum(old[: run.start])
                    end = start + sum(old[run.start : run.end])
                    parts.append(memoryview(run.block.chunks[family].raw)[start:end])
                    lengths.extend(old[run.start : run.end])
                else:
                    parts.append(run[family])
                    lengths.append(len(run[family]))
            self.chunks.append(Chunk(b"".join(parts)))
            self.lengths.append(lengths)


class _Place(NamedTuple):
    block: _Block
    at: int  # the message's position in the block


class _Run(NamedTuple):
    block: _Block
    start: int
    end: int


def _runs(rows: Sequence[Row | _Place]) -> list[Row | _Run]:
    """Fresh rows as they are; places one after the other in the same block as one run."""
    runs: list[Row | _Run] = []
    block, start, end = None, 0, 0
    for row in rows:
        if isinstance(row, _Place) and row.block is block and row.at == end:
            end += 1
            continue
        if block is not None:
            runs.append(_Run(block, start, end))
        if isinstance(row, _Place):
            block, start, end = row.block, row.at, row.at + 1
        else:
            block = None
            runs.append(row)
    if block is not None:
        runs.append(_Run(block, start, end))
    return runs


class MessageFamily(Metric):
    """One per-message family of one scrape. The fast path reads its ``chunks()``; its
    ``samples`` (``generate_latest``, OpenMetrics, ``get_sample_value``) are built if read.
    """

    def __init__(self, scrape: _Scrape, index: int, name: str, documentation: str) -> None:
        super().__init__(name, documentation, "gauge")
        self._scrape = scrape
        self._index = index
        self._built: list[Sample] | None = None

    @property
    def samples(self) -> list[Sample]:
        if self._built is None:
            self._built = self._scrape.samples(self._index)
        return self._built

    @samples.setter
    def samples(self, samples: list[Sample]) -> None:
        self._built = samples

    def chunks(self, openmetrics: bool = False) -> list[Chunk]:
        """The family's header (in the format asked for), then its sample lines."""
        header, *lines = self._scrape.chunks()[self._index]
        if openmetrics:
            header = self._scrape.openmetrics_header(self._index)
        return [header, *lines]


class PrerenderedFamily(Metric):
    """A family that keeps its text in each format once written: the exposition sends it as
    it is for as long as its owner hands out the same object (a new one when it changes)."""

    def __init__(self, metric: Metric) -> None:
        super().__init__(metric.name, metric.documentation, metric.type, metric.unit)
        self.samples = metric.samples
        self._text: dict[bool, Chunk] = {}

    def chunks(self, openmetrics: bool = False) -> list[Chunk]:
        chunk = self._text.get(openmetrics)
        if chunk is None:
            write = openmetrics_body if openmetrics else generate_latest
            chunk = self._text[openmetrics] = Chunk(write(FixedMetrics([self])))
        return [chunk]


class _Scrape:
    """What one collect() saw, shared by its per-message families."""

    def __init__(self, lines: MessageLines[View], messages: Sequence[TrackedMessage]) -> None:
        self._lines = lines
        self._messages = messages
        self._chunks: list[list[Chunk]] | None = None
        self._samples: list[Sequence[Samples]] | None = None

    def openmetrics_header(self, index: int) -> Chunk:
        return self._lines.openmetrics_headers[index]

    def chunks(self) -> list[list[Chunk]]:
        if self._chunks is None:
            self._chunks = self._lines.chunks(self._messages)
        return self._chunks

    def samples(self, index: int) -> list[Sample]:
        lines = self._lines
        if self._samples is None:
            self._samples = [lines.samples(lines.view(m)) for m in self._messages]
        family = gauge(*lines.families[index])
        for samples in self._samples:
            for labels, value in samples[index]:
                family.add_sample(family.name, dict(labels), value)
        return family.samples


class TextExposition:
    """A registry's text-format (0.0.4) exposition as a list of parts, plain or gzip."""

    def __init__(self, registry: Collector) -> None:
        self._registry = registry
        # The running CRC-32 after each part of the last gzip body: unchanged leading
        # parts (the message families, before the ever-changing process ones) cost nothing.
        # Weak, so parts replaced since are not kept alive for this.
        self._crcs: list[tuple[weakref.ref[Chunk], int]] = []
        # One compressor, fully flushed after each part: a part's stream refers to nothing
        # before it, so parts concatenate in any order, and none pays for a new compressor.
        self._compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._lock = threading.Lock()

    def plain(self, openmetrics: bool = False) -> list[bytes]:
        return [part.raw for part in self._parts(openmetrics) if part.raw]

    def gzipped(self, openmetrics: bool = False) -> list[bytes]:
        """One gzip member: the parts' deflate streams back to back, then the trailer."""
        parts = [part for part in self._parts(openmetrics) if part.raw]
        crcs: list[tuple[weakref.ref[Chunk], int]] = []
        kept, crc, same = self._crcs, 0, True
        for i, part in enumerate(parts):
            same = same and i < len(kept) and kept[i][0]() is part
            crc = kept[i][1] if same else zlib.crc32(part.raw, crc)
            crcs.append((weakref.ref(part), crc))
        self._crcs = crcs
        size = sum(len(part.raw) for part in parts)
        trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
        with self._lock:
            streams = [part.deflated(self._deflate) for part in parts]
        # A tenth of the plain size: one copy costs less than a write per part.
        return [b"".join([_GZIP_HEADER, *streams, _LAST_BLOCK, trailer])]

    def _deflate(self, raw: bytes) -> bytes:
        return self._compressor.compress(raw) + self._compressor.flush(zlib.Z_FULL_FLUSH)

    def _parts(self, openmetrics: bool) -> list[Chunk]:
        write = openmetrics_body if openmetrics else generate_latest
        parts: list[Chunk] = []
        others: list[Metric] = []
        for metric in self._registry.collect():
            if isinstance(metric, MessageFamily | PrerenderedFamily):
                if others:
                    parts.append(Chunk(write(FixedMetrics(others))))
                    others = []
                parts.extend(metric.chunks(openmetrics))
            else:
                others.append(metric)
        if others:
            parts.append(Chunk(write(FixedMetrics(others))))
        if openmetrics:
            parts.append(_EOF)
        return parts


class FixedMetrics:
    """A collector of metrics already built, for ``generate_latest``."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def gauge(name: str, documentation: str, value: float | None = None) -> Metric:
    """A gauge family: one unlabelled sample of ``value``, or none yet if it is None."""
    metric = Metric(name, documentation, "gauge")
    if value is not None:
        metric.add_sample(name, {}, float(value))
    return metric


_EOF_LINE = b"# EOF\n"
_EOF = Chunk(_EOF_LINE)


def openmetrics_body(registry: Collector) -> bytes:
    """OpenMetrics' text for ``registry``'s families, without the ``# EOF`` that ends a whole
    exposition (the fast path puts one at the very end)."""
    return _write_openmetrics(registry).removesuffix(_EOF_LINE)


def openmetrics(metrics: list[Metric]) -> bytes:
    return openmetrics_body(FixedMetrics(metrics))


def _lines(name: str, samples: Samples, pairs: dict[tuple[str, str], str]) -> bytes:
    """``generate_latest``'s sample lines: labels sorted, values as Go formats floats.

    ``pairs`` remembers each ``name="value"`` escaped: a message's samples share most labels.
    """
    lines = []
    for labels, value in samples:
        if labels:
            text = ",".join(
                [pairs.get(pair) or _pair(pairs, pair) for pair in sorted(labels.items())]
            )
            lines.append(f"{name}{{{text}}} {_go_float(value)}\n")
        else:
            lines.append(f"{name} {_go_float(value)}\n")
    return "".join(lines).encode()


def _pair(pairs: dict[tuple[str, str], str], pair: tuple[str, str]) -> str:
    name, value = pair
    text = pairs[pair] = f'{name}="{_escape(value)}"'
    return text


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
