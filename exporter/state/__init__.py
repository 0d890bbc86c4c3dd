"""What must survive a restart: each message's phase and last values, the totals, and the
messages registered over HTTP, for each source (upstream API) the exporter polls.

One SQLite file in WAL mode holds every source; a ``StateStore`` reads and writes only its
own source's rows, and every ``save`` replaces them in one transaction, so a crash at any
moment leaves the previous complete state. A file that is not this exporter's, is damaged, or
comes from a newer version is moved aside at ``load`` and a fresh store takes its place:
startup never fails on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping

from exporter.domain import MessageSpec
from exporter.state.records import StoredMessage, StoredState, aggregate_row, message_row
from exporter.state.schema import (
    APPLICATION_ID,
    INSERT_AGGREGATE,
    INSERT_MESSAGE,
    MAGIC,
    MEMORY,
    SCHEMA_VERSION,
    TABLES,
    connect,
    read,
    read_every_source,
)
from exporter.totals import label_sets

__all__ = ["MEMORY", "StateStore", "StateStoreError", "StoredMessage", "StoredState"]
_INSERT_REGISTERED = "INSERT INTO registered VALUES (?, ?, ?, ?, ?, ?, ?)"
_VOLATILE = "state is kept in memory only and will not survive a restart"


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
                return None if self._conn is None else read(self._conn, self.source)
            except (sqlite3.Error, ValueError, TypeError) as e:
                self.problem = f"state file {self.path} cannot be read ({e})"
                return None

    def save(self, state: StoredState) -> None:
        """Replace this source's stored state with ``state``, all or nothing."""
        source = self.source
        messages = [(source, *message_row(m)) for m in state.messages.values()]
        aggregates = [(source, *aggregate_row(labels, t)) for labels, t in label_sets(state.totals)]
        registered = [_registered_row(source, i, m) for i, m in enumerate(state.registered)]
        totals = state.totals
        sums = (source, state.saved_at, totals.overflow, json.dumps(totals.buckets))
        with self._transaction() as conn:
            if conn is None:
                return
            conn.execute("DELETE FROM messages WHERE source = ?", (source,))
            conn.executemany(INSERT_MESSAGE, messages)
            conn.execute("DELETE FROM aggregates WHERE source = ?", (source,))
            conn.executemany(INSERT_AGGREGATE, aggregates)
            conn.execute("DELETE FROM registered WHERE source = ?", (source,))
            conn.executemany(_INSERT_REGISTERED, registered)
            conn.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?)", sums)

    def save_registrations(self, changes: Mapping[str, MessageSpec | None]) -> None:
        """Write just these registrations (None: deleted), after the others in order: a
        registration is on disk at once without rewriting every message."""
        source = self.source
        with self._transaction() as conn:
            if conn is None:
                return
            conn.executemany(
                "DELETE FROM registered WHERE source = ? AND id = ?",
                [(source, message_id) for message_id in changes],
            )
            (start,) = conn.execute(
                "SELECT COALESCE(MAX(position), -1) + 1 FROM registered WHERE source = ?",
                (source,),
            ).fetchone()
            # A source never saved whole has no row yet: it would read back as empty.
            conn.execute(
                "INSERT OR IGNORE INTO sources VALUES (?, ?, 0, '[]')", (source, self._clock())
            )
            added = [spec for spec in changes.values() if spec is not None]
            rows = [_registered_row(source, start + i, m) for i, m in enumerate(added)]
            conn.executemany(_INSERT_REGISTERED, rows)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection | None]:
        """One write transaction on the file (None where there is no usable file): committed
        if the block ends, rolled back if it raises; a refusal is ``StateStoreError``."""
        with self._lock:
            if not self._opened:
                self._open()
            if (conn := self._conn) is None:
                yield None
                return
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                raise StateStoreError(f"cannot save state to {self.path}: {e}") from e

    @property
    def writable(self) -> bool:
        """False once ``load`` found the file unusable (saves then do nothing)."""
        return not self._opened or self.path == MEMORY or self._conn is not None

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
            self._conn = connect(self.path)
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


def _registered_row(source: str, position: int, spec: MessageSpec) -> tuple[object, ...]:
    labels = json.dumps(dict(spec.labels))
    return (source, position, spec.id, labels, spec.sent_at, spec.scheduled_at, spec.transactional)


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
    if header and not header.startswith(MAGIC):
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
        if version not in TABLES or not tables >= TABLES[version]:
            raise _Unusable("corrupt", f"is corrupt (schema version {version}, missing tables)")
        return read_every_source(conn, source)
    except (ValueError, TypeError) as e:
        raise _Unusable("corrupt", f"is corrupt (unreadable data: {e})") from e
    except sqlite3.DatabaseError as e:
        if e.sqlite_errorname.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_ERROR")):
            raise _Unusable("corrupt", f"is corrupt ({e})") from e
        raise
    finally:
        conn.close()
