"""``message_files``: messages listed in YAML or JSON files found by glob, re-read on change.

Like Prometheus ``file_sd_configs``: each refresh globs again and stats every match, and
reads only a file that is new or whose (mtime, size, inode, ctime) changed. A file that
cannot be used keeps the messages it last had; it is read again once its writer changes it.
A file written in place can be read half-written, and a half that parses (a YAML list cut at
a line) lists fewer messages: writers should write a temporary file and ``os.replace`` it into
place, which is always seen whole (``.*`` and ``*.tmp`` are never read).

Sample exposition::

    mailpartner_exporter_message_files 2.0
    mailpartner_exporter_message_file_errors_total 1.0
    mailpartner_exporter_message_file_duplicates 0.0
    mailpartner_exporter_discovered_messages 1000.0
"""

from __future__ import annotations

import glob
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from exporter.config.convert import load_yaml
from exporter.config.errors import (
    ConfigError,
    ConfigErrors,
    InvalidTypeError,
    SyntaxConfigError,
    UnknownKeyError,
)
from exporter.config.reader import parse_messages
from exporter.domain import MessageSpec

MAX_FILE_BYTES = 16 * 2**20
# Past this many new duplicates in one refresh, one line sums up the rest.
_LOGGED_DUPLICATES = 10
log = logging.getLogger(__name__)


class _Signature(NamedTuple):
    mtime_ns: int
    size: int
    inode: int
    # chmod and chown change only ctime: a file made readable that way must be read again.
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Signature:
        return cls(st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


@dataclass(frozen=True)
class _FileState:
    signature: _Signature | None  # of the last attempt; None when even stat failed
    messages: tuple[MessageSpec, ...]  # the last content that parsed
    problem: str | None = None  # why the last attempt failed


@dataclass(frozen=True)
class DiscoveryStatus:
    """How discovery stands, for the metrics and the status page."""

    files: int  # matched by the globs, usable or not
    messages: int  # after duplicates are dropped
    duplicates: int  # entries ignored because an earlier file lists the same ID
    errors_total: int  # failed reads over the process's life, one per change of a file
    last_refresh: float | None  # None until the first refresh
    problems: tuple[tuple[str, str], ...]  # (path, error) for each file now unusable


class MessageFiles(Collector):
    """The messages of every file matching ``patterns`` (relative ones under ``base_dir``).

    ``refresh`` runs in one thread; ``messages``, ``snapshot`` and ``collect`` from any.
    """

    def __init__(
        self, patterns: Sequence[str], base_dir: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._patterns = tuple(patterns)
        self._base_dir = base_dir
        self._clock = clock
        self._refreshing = threading.Lock()
        # Touched only while refreshing.
        self._files: dict[str, _FileState] = {}
        self._duplicates: frozenset[tuple[str, str, str]] = frozenset()
        self._errors = 0
        # What readers see, swapped whole.
        self._lock = threading.Lock()
        self._messages: tuple[MessageSpec, ...] = ()
        self._status = DiscoveryStatus(0, 0, 0, 0, None, ())

    @property
    def messages(self) -> tuple[MessageSpec, ...]:
        """Every file's messages in path order; an ID in several files comes from the first."""
        with self._lock:
            return self._messages

    def snapshot(self) -> DiscoveryStatus:
        with self._lock:
            return self._status

    def refresh(self) -> bool:
        """Glob again and read what changed; True if ``messages`` changed."""
        with self._refreshing:
            paths = self._glob()
            changed = False
            for path in sorted(self._files.keys() - paths):
                gone = self._files.pop(path)
                log.info(
                    "message file gone; dropping its messages",
                    extra={"file": path, "messages": len(gone.messages)},
                )
                changed = True
            for path in sorted(paths):
                state = self._files.get(path)
                self._files[path] = self._update(path, state)
                changed |= self._files[path] is not state
            with self._lock:
                messages, duplicates = self._messages, self._status.duplicates
            if changed:
                messages, duplicates = self._merge()
            problems = tuple((p, s.problem) for p, s in sorted(self._files.items()) if s.problem)
            status = DiscoveryStatus(
                len(paths), len(messages), duplicates, self._errors, self._clock(), problems
            )
            with self._lock:
                previous, self._messages, self._status = self._messages, messages, status
            return messages != previous

    def collect(self, prefix: str = "mailpartner") -> Iterator[Metric]:
        """The four series, named ``<prefix>_exporter_…`` (``smspartner`` for SMS Partner's)."""
        status = self.snapshot()
        for name, kind, documentation, value in (
            (
                "mailpartner_exporter_message_files",
                "gauge",
                "Files matched by the message_files globs, usable or not.",
                status.files,
            ),
            (
                "mailpartner_exporter_message_file_errors",
                "counter",
                "Message files that could not be used (each keeps its previous messages).",
                status.errors_total,
            ),
            (
                "mailpartner_exporter_message_file_duplicates",
                "gauge",
                "Message file entries ignored because a file earlier in path order lists the ID.",
                status.duplicates,
            ),
            (
                "mailpartner_exporter_discovered_messages",
                "gauge",
                "Messages read from the message_files.",
                status.messages,
            ),
        ):
            named = name.replace("mailpartner", prefix, 1)
            metric = Metric(named, documentation, kind)
            metric.add_sample(f"{named}_total" if kind == "counter" else named, {}, value)
            yield metric

    def _open(self, path: str) -> BinaryIO:
        """The one open of a file per read."""
        return open(path, "rb")

    def _glob(self) -> set[str]:
        # root_dir rather than joining: glob characters in base_dir stay literal.
        return {
            os.path.normpath(os.path.join(self._base_dir, match))
            for pattern in self._patterns
            for match in glob.glob(pattern, root_dir=self._base_dir or None, recursive=True)
            if not match.endswith(".tmp")
        }

    def _update(self, path: str, state: _FileState | None) -> _FileState:
        """``state`` itself while the file is unchanged, else the outcome of reading it."""
        signature: _Signature | None = None
        try:
            st = os.stat(path)
            signature = _Signature.of(st)
            if state is not None and state.signature == signature:
                return state
            if not stat.S_ISREG(st.st_mode):
                raise ConfigErrors([ConfigError(path, "", "is not a regular file")])
            with self._open(path) as f:
                # The signature of what is read, not of what the path held at stat.
                st = os.fstat(f.fileno())
                signature = _Signature.of(st)
                if st.st_size > MAX_FILE_BYTES:
                    raise _too_large(path)
                data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise _too_large(path)
            messages = _parse(path, data)
        except OSError as e:
            problem = ConfigError(path, "", f"cannot read: {e.strerror or e}")
            return self._failed(path, state, signature, str(problem))
        except ConfigErrors as e:
            return self._failed(path, state, signature, str(e))
        if state is not None and state.problem:
            log.info(
                "message file fixed; using its new content",
                extra={"file": path, "messages": len(messages)},
            )
        else:
            log.debug("message file read", extra={"file": path, "messages": len(messages)})
        return _FileState(signature, messages)

    def _failed(
        self, path: str, state: _FileState | None, signature: _Signature | None, error: str
    ) -> _FileState:
        if state is not None and signature is None and state.signature is None:
            return state  # stat keeps failing: nothing new to say
        self._errors += 1
        kept = state.messages if state else ()
        log.warning(
            "message file not loaded; keeping its previous messages",
            extra={"file": path, "err": error, "kept": len(kept)},
        )
        return _FileState(signature, kept, error)

    def _merge(self) -> tuple[tuple[MessageSpec, ...], int]:
        owner: dict[str, str] = {}
        merged: list[MessageSpec] = []
        duplicates: set[tuple[str, str, str]] = set()
        for path in sorted(self._files):
            for spec in self._files[path].messages:
                first = owner.setdefault(spec.id, path)
                if first == path:  # parse_messages refuses an ID twice in one file
                    merged.append(spec)
                else:
                    duplicates.add((spec.id, first, path))
        new = sorted(duplicates - self._duplicates)
        for message_id, first, ignored in new[:_LOGGED_DUPLICATES]:
            log.warning(
                "message ID in more than one message file; the first file's entry wins",
                extra={"message_id": message_id, "file": first, "ignored_file": ignored},
            )
        if len(new) > _LOGGED_DUPLICATES:
            log.warning(
                "more message IDs in more than one message file, not logged one by one",
                extra={"count": len(new) - _LOGGED_DUPLICATES},
            )
        self._duplicates = frozenset(duplicates)
        return tuple(merged), len(duplicates)


def _too_large(path: str) -> ConfigErrors:
    return ConfigErrors(
        [ConfigError(path, "", f"larger than {MAX_FILE_BYTES // 2**20} MiB; not read")]
    )


def _parse(path: str, data: bytes) -> tuple[MessageSpec, ...]:
    """``{"messages": [...]}`` or a bare list, in JSON (``.json``) or YAML (anything else)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigErrors(
            [SyntaxConfigError(path, "", f"byte {e.start}: not valid UTF-8")]
        ) from None
    if not text.strip():
        return ()
    try:
        document = _json(path, text) if path.lower().endswith(".json") else load_yaml(text, path)
    except RecursionError:
        raise ConfigErrors([SyntaxConfigError(path, "", "nested too deeply")]) from None
    if document is None or isinstance(document, list):
        # A bare list's entries are named [0], [1], ... as the file has no messages key.
        return parse_messages(document, path, key="")
    if not isinstance(document, dict):
        raise ConfigErrors(
            [
                InvalidTypeError(
                    path, "", "must be a list of messages or a mapping with a messages list"
                )
            ]
        )
    problems: list[ConfigError] = [
        UnknownKeyError(path, str(k), "unknown key (a message file holds only messages)")
        for k in document
        if k != "messages"
    ]
    try:
        messages = parse_messages(document.get("messages"), path)
    except ConfigErrors as e:
        problems += e.errors
    if problems:
        raise ConfigErrors(problems)
    return messages


def _json(path: str, text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        problem = f"line {e.lineno}, column {e.colno}: {e.msg}"
        raise ConfigErrors([SyntaxConfigError(path, "", problem)]) from None
    except ValueError as e:  # from _unique_keys
        raise ConfigErrors([SyntaxConfigError(path, "", str(e))]) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice as the YAML loader does (json keeps the last)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen
