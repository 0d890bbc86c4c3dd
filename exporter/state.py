"""What must survive a restart: each message's phase and last values, the totals, and the
messages registered over HTTP, for each source (upstream API) the exporter polls.

One SQLite file in WAL mode holds every source; a ``StateStore`` reads and writes only its
own source's rows, and every ``save`` replaces them in one transaction, so a crash at any
moment leaves the previous complete state. A file that is not this exporter's, is damaged, or
comes from a newer version is moved aside at ``load`` and a fresh store takes its place:
startup never fails on it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from exporter.aggregate import MessageAggregate
from exporter.domain import MessageSpec, State

MEMORY = ":memory:"
APPLICATION_ID = 0x4D504558  # "MPEX" in the file header: marks the file as ours
SCHEMA_VERSION = 2
# exporter.tracker.Phase values; not imported, as the tracker is this module's caller.
_PHASES = frozenset({"active", "settled", "final"})
_MAGIC = b"SQLite format 3\x00"
# What the file must have. Version 2 is the first any release wrote (version 1 never left
# development), so there is nothing older to migrate.
_TABLES = frozenset({"sources", "messages", "totals", "registered"})
_VOLATILE = "state is kept in memory only and will not survive a restart"
# A source without a row in sources has never been saved. registered keeps the order of
# registration in position.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY, cost_total REAL NOT NULL, saved_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    source TEXT NOT NULL, id TEXT NOT NULL, first_seen REAL NOT NULL, phase TEXT NOT NULL,
    final_at REAL, last_success REAL, states_json TEXT, statuses_json TEXT, cost REAL,
    unsubscribed INTEGER, last_report REAL, PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (
    source TEXT NOT NULL, state TEXT NOT NULL, recipients INTEGER NOT NULL,
    PRIMARY KEY (source, state)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS registered (
    source TEXT NOT NULL, position INTEGER NOT NULL, id TEXT NOT NULL, labels_json TEXT NOT NULL,
    sent_at REAL, PRIMARY KEY (source, position)
) WITHOUT ROWID;
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""
_INSERT = "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # in _SCHEMA's order


@dataclass(frozen=True)
class StoredMessage:
    id: str
    first_seen: float
    phase: str  # an exporter.tracker.Phase value
    final_at: float | None
    last_success: float | None
    aggregate: MessageAggregate | None


@dataclass(frozen=True)
class StoredState:
    messages: Mapping[str, StoredMessage]
    recipients_total: Mapping[State, int]
    cost_total: float
    saved_at: float
    registered: tuple[MessageSpec, ...] = ()  # over HTTP, in the order they came


class StateStoreError(Exception):
    """A save that could not be written; the previous state is still on disk."""


class _Unusable(Exception):
    """``(kind, what)``: the file is not a readable state of ours; move it to ``.<kind>-…``."""


class StateStore:
    """``source``'s state in the file at ``path``; ``":memory:"`` keeps nothing (every call is
    a no-op). Stores of other sources may share the file, even open at the same time.

    ``load`` sets ``problem`` when it moved the file aside, or cannot use the path
    (then saves do nothing). ``save`` raises ``StateStoreError`` if the disk refuses.
    """

    def __init__(
        self,
        path: str,
        *,
        source: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.source = source
        self.problem: str | None = None
        self._clock = clock
        self._lock = threading.Lock()  # save runs in the poll loop, close in the main thread
        self._conn: sqlite3.Connection | None = None
        self._opened = path == MEMORY

    def load(self) -> StoredState | None:
        """The last saved state; None when there is none (a new, empty or unusable file)."""
        with self._lock:
            if not self._opened:
                return self._open()
            try:  # a second load reads back what this store wrote
                return None if self._conn is None else _read(self._conn, self.source)
            except (sqlite3.Error, ValueError, TypeError) as e:
                self.problem = f"state file {self.path} cannot be read ({e})"
                return None

    def save(self, state: StoredState) -> None:
        """Replace this source's stored state with ``state``, all or nothing."""
        source = self.source
        messages = [(source, *_row(m)) for m in state.messages.values()]
        totals = [(source, str(s), n) for s, n in state.recipients_total.items()]
        registered = [
            (source, i, m.id, json.dumps(dict(m.labels)), m.sent_at)
            for i, m in enumerate(state.registered)
        ]
        with self._lock:
            if not self._opened:
                self._open()
            if (conn := self._conn) is None:
                return
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute("DELETE FROM messages WHERE source = ?", (source,))
                    conn.executemany(_INSERT, messages)
                    conn.execute("DELETE FROM totals WHERE source = ?", (source,))
                    conn.executemany("INSERT INTO totals VALUES (?, ?, ?)", totals)
                    conn.execute("DELETE FROM registered WHERE source = ?", (source,))
                    conn.executemany("INSERT INTO registered VALUES (?, ?, ?, ?, ?)", registered)
                    sums = (source, state.cost_total, state.saved_at)
                    conn.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?)", sums)
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                raise StateStoreError(f"cannot save state to {self.path}: {e}") from e

    def close(self) -> None:
        """Close the file; later calls do nothing."""
        with self._lock:
            self._opened = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _open(self) -> StoredState | None:
        self._opened = True
        directory = os.path.dirname(os.path.abspath(self.path))
        if wrong := _unfit(directory):
            self.problem = f"state directory {directory} {wrong}; {_VOLATILE}"
            return None
        state = None
        try:
            state = _read_file(self.path, self.source)
        except _Unusable as bad:
            kind, what = bad.args
            try:
                moved = self._move_aside(kind)
            except OSError as e:
                self.problem = f"state file {self.path} {what}, not moved aside ({e}); {_VOLATILE}"
                return None
            self.problem = f"state file {self.path} {what}; moved aside to {moved}"
        except (OSError, sqlite3.Error) as e:
            self.problem = f"state file {self.path} cannot be read ({e}); {_VOLATILE}"
            return None
        try:
            self._conn = _connect(self.path)
        except (OSError, sqlite3.Error) as e:
            unusable = f"state file {self.path} cannot be written ({e}); {_VOLATILE}"
            self.problem = f"{self.problem}; {unusable}" if self.problem else unusable
        return state

    def _move_aside(self, kind: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        moved = base = f"{self.path}.{kind}-{stamp}"
        n = 1
        while os.path.lexists(moved):
            n += 1
            moved = f"{base}-{n}"
        os.replace(self.path, moved)
        # A stale -wal left beside the fresh file would be replayed into it.
        for suffix in ("-wal", "-shm", "-journal"):
            if os.path.lexists(self.path + suffix):
                os.replace(self.path + suffix, moved + suffix)
        return moved


def _unfit(directory: str) -> str:
    """Why the state file cannot live in ``directory`` (its -wal goes there too), or ''."""
    if not os.path.isdir(directory):
        return "is not a directory" if os.path.exists(directory) else "does not exist"
    return "" if os.access(directory, os.W_OK) else "is not writable"


def _read_file(path: str, source: str) -> StoredState | None:
    """``source``'s state if ``path`` is an intact state file of ours; ``_Unusable`` if not."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        header = f.read(100)
    if header and not header.startswith(_MAGIC):
        raise _Unusable("corrupt", "is corrupt (not an SQLite database)")
    if 0 < len(header) < 100:
        raise _Unusable("corrupt", "is corrupt (truncated header)")
    # Read-only, so a file that is not ours is left exactly as it was.
    conn = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True)
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        if app_id == 0 and version == 0 and not tables:
            return None  # empty: a fresh store goes here
        if app_id != APPLICATION_ID:
            found = f"application_id {app_id:#x}, tables: {', '.join(sorted(tables)) or 'none'}"
            raise _Unusable("foreign", f"belongs to another application ({found})")
        if version > SCHEMA_VERSION:
            newer = f"schema version {version}, this one reads up to {SCHEMA_VERSION}"
            raise _Unusable("newer", f"was written by a newer exporter ({newer})")
        check = [r[0] for r in conn.execute("PRAGMA quick_check(3)")]
        if check != ["ok"]:
            raise _Unusable("corrupt", f"is corrupt ({'; '.join(check)})")
        if version != SCHEMA_VERSION or not tables >= _TABLES:
            raise _Unusable("corrupt", f"is corrupt (schema version {version}, missing tables)")
        return _read_every_source(conn, source)
    except (ValueError, TypeError) as e:
        raise _Unusable("corrupt", f"is corrupt (unreadable data: {e})") from e
    except sqlite3.DatabaseError as e:
        if e.sqlite_errorname.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_ERROR")):
            raise _Unusable("corrupt", f"is corrupt ({e})") from e
        raise
    finally:
        conn.close()


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: atomic, and durable past a crash
        # Also a write on every start: a file that cannot take one is found now, not at save.
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):  # executescript would commit
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def _read_every_source(conn: sqlite3.Connection, source: str) -> StoredState | None:
    """``source``'s state, once every source's reads: the file is moved aside for all or none."""
    sources = [row[0] for row in conn.execute("SELECT source FROM sources")]
    return {s: _read(conn, s) for s in sources}.get(source)


def _read(conn: sqlite3.Connection, source: str) -> StoredState | None:
    key = (source,)
    sums = conn.execute("SELECT cost_total, saved_at FROM sources WHERE source = ?", key)
    if (saved := sums.fetchone()) is None:
        return None  # never saved
    messages = {}
    for row in conn.execute("SELECT * FROM messages WHERE source = ?", key):
        message = _message(row[1:])
        messages[message.id] = message
    totals = dict.fromkeys(State, 0)
    for state, count in conn.execute("SELECT state, recipients FROM totals WHERE source = ?", key):
        totals[State(state)] = int(count)
    registered = conn.execute(
        "SELECT id, labels_json, sent_at FROM registered WHERE source = ? ORDER BY position", key
    )
    return StoredState(
        messages=MappingProxyType(messages),
        recipients_total=MappingProxyType(totals),
        cost_total=float(saved[0]),
        saved_at=float(saved[1]),
        registered=tuple(_spec(*row) for row in registered),
    )


def _row(m: StoredMessage) -> tuple[Any, ...]:
    if m.phase not in _PHASES:  # or the next load would find the file corrupt
        raise ValueError(f"message {m.id}: unknown phase {m.phase!r}")
    head = (m.id, m.first_seen, str(m.phase), m.final_at, m.last_success)
    a = m.aggregate
    if a is None:
        return (*head, None, None, None, None, None)
    states = json.dumps({str(s): n for s, n in a.states.items()})
    return (*head, states, json.dumps(dict(a.statuses)), a.cost, a.unsubscribed, a.last_report)


def _message(row: tuple[Any, ...]) -> StoredMessage:
    id_, first_seen, phase, final_at, last_success, states, statuses, cost, unsub, last = row
    if phase not in _PHASES:
        raise ValueError(f"message {id_}: unknown phase {phase!r}")
    aggregate = None
    if states is not None:
        by_state = dict.fromkeys(State, 0)
        by_state.update({State(s): n for s, n in _counts(states).items()})
        aggregate = MessageAggregate(
            states=MappingProxyType(by_state),
            statuses=MappingProxyType(_counts(statuses)),
            cost=float(cost),
            unsubscribed=int(unsub),
            last_report=_optional(last),
        )
    first, final, success = float(first_seen), _optional(final_at), _optional(last_success)
    return StoredMessage(str(id_), first, str(phase), final, success, aggregate)


def _spec(id_: Any, labels: str, sent_at: Any) -> MessageSpec:
    by_name = {k: str(v) for k, v in _object(labels, "labels").items()}
    return MessageSpec(str(id_), MappingProxyType(by_name), _optional(sent_at))


def _counts(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in _object(text, "counts").items()}


def _object(text: str, what: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise TypeError(f"expected {what}, got {text[:40]!r}")
    return value


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)
