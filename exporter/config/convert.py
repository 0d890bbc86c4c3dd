"""Reading YAML and checking values, the same way for every file the exporter reads.

The config loader, source options, message files (``exporter.discovery``) and the web config
(``exporter.webconfig``) all parse YAML with ``load_yaml`` and check values with the
converters below, so a problem reads the same wherever it is found. A converter takes the
raw value and returns the checked one, or raises ``TypeError``/``ValueError`` with the problem
(``NotADuration`` for durations); the readers turn that into a ``file: key: problem`` error.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections.abc import Callable, Hashable
from typing import Any

import yaml

from exporter.config.duration import parse_duration
from exporter.config.errors import ConfigErrors, SyntaxConfigError

# Control characters (C0, DEL, C1) and the bidirectional marks and overrides, which would
# make a label or a status page line read otherwise than it is (Trojan Source).
_HIDDEN = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_MESSAGE_ID = re.compile(rf"[^\s{_HIDDEN}]{{1,128}}")
_HIDDEN_CHARACTER = re.compile(f"[{_HIDDEN}]")
# Limits shared by the config, message files and registrations: what one message may carry.
MAX_LABEL_VALUE = 128
# Times outside these years are typing mistakes (milliseconds, a year 9999 placeholder).
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC).timestamp()
LATEST = dt.datetime(2100, 1, 1, tzinfo=dt.UTC).timestamp()
_SIZE = re.compile(r"(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)")
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}


# libyaml's parser where PyYAML was built with it: a list of 30,000 messages loads in a
# fraction of the time and memory of the pure-Python one. Only the constructor below is
# Python either way, so both refuse the same duplicate keys.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UniqueKeyLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # a list or a mapping as a key
                raise _unhashable(key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def load_yaml(text: str, file: str) -> object:
    """The YAML document in ``text``; ``ConfigErrors`` naming ``file`` and the position.

    Only the problem and the position are said: PyYAML's full text quotes the file's lines,
    which may hold a key or a password hash.
    """
    try:
        try:
            return _streamed(text)
        except _NotPlain:
            return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigErrors([SyntaxConfigError(file, "", f"{where}{problem}")]) from None


class _NotPlain(Exception):
    """Anchors, aliases, merge keys, explicit collection tags or several documents: the
    node-based loader reads it, for exactly its outcome."""


def _streamed(text: str) -> object:
    """The document built straight from the parser's events, as the loader would build it but
    without its tree of nodes, which costs several times the document itself: a message list
    of 30,000 entries then needs tens of MB less, for good (the freed memory stays mapped)."""
    loader = UniqueKeyLoader(text)
    try:
        loader.get_event()  # the stream's start
        if loader.check_event(yaml.StreamEndEvent):
            return None
        loader.get_event()  # the document's start
        document = _event_value(loader)
        loader.get_event()  # the document's end
        if not loader.check_event(yaml.StreamEndEvent):
            raise _NotPlain
        return document
    finally:
        loader.dispose()


def _event_value(loader: UniqueKeyLoader) -> Any:
    event = loader.get_event()
    if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
        raise _NotPlain
    if isinstance(event, yaml.ScalarEvent):
        tag = event.tag
        if tag is None or tag == "!":
            tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == "tag:yaml.org,2002:merge" or tag not in loader.yaml_constructors:
            raise _NotPlain
        # libyaml's marks, as its own composer passes them (the stubs know only PyYAML's).
        start: Any = event.start_mark
        end: Any = event.end_mark
        node = yaml.ScalarNode(tag, event.value, start, end, event.style)
        return loader.yaml_constructors[tag](loader, node)
    if event.tag not in (None, "!", _SEQ, _MAP):
        raise _NotPlain
    if isinstance(event, yaml.SequenceStartEvent):
        items = []
        while not loader.check_event(yaml.SequenceEndEvent):
            items.append(_event_value(loader))
        loader.get_event()
        return items
    mapping: dict[Any, Any] = {}
    while not loader.check_event(yaml.MappingEndEvent):
        mark = loader.peek_event().start_mark
        key = _event_value(loader)
        if not isinstance(key, Hashable):  # a list or a mapping as a key
            raise _unhashable(mark)
        if key in mapping:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", mark)
        mapping[key] = _event_value(loader)
    loader.get_event()
    return mapping


def _unhashable(mark: Any) -> yaml.constructor.ConstructorError:
    return yaml.constructor.ConstructorError(None, None, "found unhashable key", mark)


_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"


# -- words for problems ---------------------------------------------------------------------
def kind(value: object) -> str:
    """How a problem names the type of ``value``: ``a mapping``, ``a list``, ``empty``, …"""
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "empty"}.get(
        type(value), type(value).__name__
    )


def join(key: str, name: str) -> str:
    """The key path of ``name`` inside ``key`` (``api`` + ``timeout``: ``api.timeout``)."""
    return f"{key}.{name}" if key else name


def unknown(name: object, allowed: frozenset[str]) -> str:
    """The problem for a key not in ``allowed``, with the closest one as a hint."""
    close = difflib.get_close_matches(str(name), sorted(allowed), n=1)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def describe(error: BaseException) -> str:
    """An exception as ``Type: message``, short enough for one line of an error list."""
    return f"{type(error).__name__}: {error}"[:300]


# -- converters ------------------------------------------------------------------------------
class NotADuration(ValueError):
    """Not a Prometheus duration such as ``30s`` or ``1h30m``."""


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, not {kind(value)}")
    return value


def string(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not {kind(value)}")
    return value


def duration(value: object) -> float:
    if not isinstance(value, str):
        raise NotADuration(f"must be a duration such as 30s or 2h, not {kind(value)}")
    try:
        return parse_duration(value)
    except ValueError as e:
        raise NotADuration(str(e)) from None


def positive_duration(value: object) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def integer_from(low: int) -> Callable[[object], int]:
    """A converter to an integer of at least ``low``."""

    def convert(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"must be an integer, not {kind(value)}")
        if value < low:
            raise ValueError(f"must be at least {low}")
        return value

    return convert


positive_int = integer_from(1)
non_negative_int = integer_from(0)


def increasing_numbers(value: object) -> tuple[float, ...]:
    """A non-empty list of positive numbers, each greater than the one before (bucket bounds)."""
    if not isinstance(value, list) or not value:
        raise TypeError(f"must be a non-empty list of numbers, not {kind(value)}")
    numbers: list[float] = []
    for number in value:
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise TypeError(f"must be a list of numbers; {number!r} is {kind(number)}")
        if not 0 < number < float("inf"):
            raise ValueError(f"{number!r} is not a positive, finite number")
        if numbers and number <= numbers[-1]:
            raise ValueError(f"must increase: {number!r} follows {numbers[-1]!r}")
        numbers.append(float(number))
    return tuple(numbers)


def byte_size(value: object) -> int:
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a size such as 256MiB or 64MB")
    size = int(match[1]) * _SIZE_UNITS[match[2]]
    if size < 1024:
        raise ValueError("must be at least 1KiB")
    return size


def path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("must be a file path, or :memory: to keep no state")
    return value


def choice(*allowed: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return str(value)

    return convert


def base_url(value: object) -> str:
    if not isinstance(value, str) or not re.match(r"https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


def message_id(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"must be a string, not {kind(value)}")
    text = str(value)
    if not _MESSAGE_ID.fullmatch(text):
        raise ValueError(
            "must be 1 to 128 characters without spaces, control or bidirectional characters"
        )
    return text


def label_value(value: object) -> str:
    """A message label's value: a scalar, as text (booleans as ``true``/``false``)."""
    if isinstance(value, dict | list) or value is None:
        raise TypeError("label values must be scalars")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if len(text) > MAX_LABEL_VALUE:
        raise ValueError(
            f"is {len(text)} characters long; label values take at most {MAX_LABEL_VALUE}"
        )
    if _HIDDEN_CHARACTER.search(text):
        raise ValueError("has a control or bidirectional character")
    return text


def timestamp(value: object) -> float:
    """An RFC 3339 time or epoch seconds, between the years 2000 and 2100."""
    if isinstance(value, bool):
        raise TypeError("must be a time such as 2026-11-26T10:00:00Z")
    if isinstance(value, int | float):
        return plausible_time(value)
    if isinstance(value, str):
        text = value
        try:
            value = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{text[:40]!r} is not an RFC 3339 time such as 2026-11-26T10:00:00Z"
            ) from None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return plausible_time(value.timestamp())
    raise TypeError(f"must be a time such as 2026-11-26T10:00:00Z, not {kind(value)}")


def plausible_time(seconds: float) -> float:
    """``seconds`` since the epoch, if it falls between 2000 and 2100."""
    if not EARLIEST <= seconds < LATEST:  # NaN fails both comparisons
        raise ValueError(
            f"{seconds!r} is not a time between 2000 and 2100 (epoch seconds or RFC 3339)"
        )
    return float(seconds)
