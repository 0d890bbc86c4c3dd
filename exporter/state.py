"""What must survive a restart: each message's phase and last values, and the totals.

One SQLite file in WAL mode; every ``save`` replaces the whole state in one
transaction, so a crash at any moment leaves the previous complete state. A file
that is not this exporter's, is damaged, or comes from a newer version is moved
aside at ``load`` and a fresh store takes its place: startup never fails on it.
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
from exporter.config import State

MEMORY = ":memory:"
APPLICATION_ID = 0x4D504558  # "MPEX" in the file header: marks the file as ours
SCHEMA_VERSION = 1
# exporter.tracker.Phase values; not imported, as the tracker is this module's caller.
_PHASES = frozenset({"active", "settled", "final"})
_MAGIC = b"SQLite format 3\x00"
_TABLES = frozenset({"meta", "messages", "totals"})
_VOLATILE = "state is kept in memory only and will not survive a restart"
# meta.value has no declared type, so a REAL such as the cost total stays a REAL.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, first_seen REAL NOT NULL, phase TEXT NOT NULL, final_at REAL,
    last_success REAL, states_json TEXT, statuses_json TEXT, cost REAL, unsubscribed INTEGER,
    last_report REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (state TEXT PRIMARY KEY, recipients INTEGER NOT NULL);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""
_INSERT = "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # in _SCHEMA's order


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


class StateStoreError(Exception):
    """A save that could not be written; the previous state is still on disk."""


class _Unusable(Exception):
    """``(kind, what)``: the file is not a readable state of ours; move it to ``.<kind>-…``."""


class StateStore:
    """The state file at ``path``; ``":memory:"`` keeps nothing (every call is a no-op).

    ``load`` sets ``problem`` when it moved the file aside, or cannot use the path
    (then saves do nothing). ``save`` raises ``StateStoreError`` if the disk refuses.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
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
                return None if self._conn is None else _read(self._conn)
            except (sqlite3.Error, ValueError, TypeError) as e:
                self.problem = f"state file {self.path} cannot be read ({e})"
                return None

    def save(self, state: StoredState) -> None:
        """Replace the stored state with ``state``, all or nothing."""
        messages = [_row(m) for m in state.messages.values()]
        totals = [(str(s), n) for s, n in state.recipients_total.items()]
        meta = [("cost_total", state.cost_total), ("saved_at", state.saved_at)]
        with self._lock:
            if not self._opened:
                self._open()
            if (conn := self._conn) is None:
                return
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute("DELETE FROM messages")
                    conn.executemany(_INSERT, messages)
                    conn.execute("DELETE FROM totals")
                    conn.executemany("INSERT INTO totals VALUES (?, ?)", totals)
                    conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
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
            state = _read_file(self.path)
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


def _read_file(path: str) -> StoredState | None:
    """Read ``path`` if it is an intact state file of ours; ``_Unusable`` if it is not."""
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
        return _read(conn)
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
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
    except BaseException:
        conn.close()
        raise
    return conn


def _read(conn: sqlite3.Connection) -> StoredState | None:
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if "saved_at" not in meta:
        return None  # created, never saved
    messages = {}
    for row in conn.execute("SELECT * FROM messages"):
        message = _message(row)
        messages[message.id] = message
    totals = dict.fromkeys(State, 0)
    for state, count in conn.execute("SELECT state, recipients FROM totals"):
        totals[State(state)] = int(count)
    return StoredState(
        messages=MappingProxyType(messages),
        recipients_total=MappingProxyType(totals),
        cost_total=float(meta["cost_total"]),
        saved_at=float(meta["saved_at"]),
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


def _counts(text: str) -> dict[str, int]:
    counts = json.loads(text)
    if not isinstance(counts, dict):
        raise TypeError(f"expected counts, got {text[:40]!r}")
    return {str(k): int(v) for k, v in counts.items()}


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)
