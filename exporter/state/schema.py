"""The state file's tables, how an older file is brought up to date, and reading a source."""

from __future__ import annotations

import contextlib
import sqlite3
from types import MappingProxyType

from exporter.state.records import (
    StoredState,
    json_list,
    message_from_row,
    spec_from_row,
    tally_from_row,
)
from exporter.totals import TotalsSnapshot

MEMORY = ":memory:"
APPLICATION_ID = 0x4D504558  # "MPEX" in the file header: marks the file as ours
SCHEMA_VERSION = 4
MAGIC = b"SQLite format 3\x00"
# What the file of each version this module reads must have (2: before aggregates by label).
TABLES = {
    2: frozenset({"sources", "messages", "totals", "registered"}),
    3: frozenset({"sources", "messages", "aggregates", "registered"}),
    4: frozenset({"sources", "messages", "aggregates", "registered"}),
}
_VOLATILE = "state is kept in memory only and will not survive a restart"
# A source without a row in sources has never been saved. registered keeps the order of
# registration in position. An aggregate's buckets_json names the bounds its delays_json
# counts in (one count per bound, then +Inf).
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY, saved_at REAL NOT NULL, overflow_total INTEGER NOT NULL,
    buckets_json TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    source TEXT NOT NULL, id TEXT NOT NULL, first_seen REAL NOT NULL, phase TEXT NOT NULL,
    final_at REAL, last_success REAL, states_json TEXT, statuses_json TEXT, cost REAL,
    unsubscribed INTEGER, last_report REAL, delays_json TEXT, delay_sum REAL, first_report REAL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aggregates (
    source TEXT NOT NULL, labels_json TEXT NOT NULL, recipients_json TEXT NOT NULL,
    cost REAL NOT NULL, unsubscribed INTEGER NOT NULL, messages INTEGER NOT NULL,
    delays_json TEXT NOT NULL, delay_sum REAL NOT NULL, PRIMARY KEY (source, labels_json)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS registered (
    source TEXT NOT NULL, position INTEGER NOT NULL, id TEXT NOT NULL, labels_json TEXT NOT NULL,
    sent_at REAL, scheduled_at REAL, transactional INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS registered_by_id ON registered (source, id);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""
# Version 2 kept unlabelled totals (one row per state) and the cost in sources: they become
# each source's aggregate of the empty label set, with no delays yet.
_V2_TO_V3 = """
ALTER TABLE messages ADD COLUMN delays_json TEXT;
ALTER TABLE messages ADD COLUMN delay_sum REAL;
ALTER TABLE sources RENAME TO sources_v2;
"""
_V2_TOTALS = """
INSERT INTO sources SELECT source, saved_at, 0, '[]' FROM sources_v2;
INSERT INTO aggregates SELECT s.source, '{}',
    COALESCE((SELECT json_group_object(t.state, t.recipients) FROM totals AS t
        WHERE t.source = s.source), '{}'),
    s.cost_total, 0, 0, '[]', 0 FROM sources_v2 AS s;
DROP TABLE sources_v2;
DROP TABLE totals
"""
# Version 4: a message's life counts from its first report; deferred and transactional sends.
_V3_TO_V4 = """
ALTER TABLE messages ADD COLUMN first_report REAL;
ALTER TABLE registered ADD COLUMN scheduled_at REAL;
ALTER TABLE registered ADD COLUMN transactional INTEGER NOT NULL DEFAULT 0;
"""
_FROM_V2 = _V2_TO_V3 + _V3_TO_V4 + _SCHEMA + _V2_TOTALS
INSERT_MESSAGE = (
    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # _SCHEMA's order
)
INSERT_AGGREGATE = "INSERT INTO aggregates VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: atomic, and durable past a crash
        # Also a write on every start: a file that cannot take one is found now, not at save.
        conn.execute("BEGIN IMMEDIATE")
        migrate(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to this version, in the caller's transaction (executescript commits)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    script = {2: _FROM_V2, 3: _V3_TO_V4 + _SCHEMA}.get(version, _SCHEMA)
    for statement in script.split(";"):
        conn.execute(statement)


def read_every_source(conn: sqlite3.Connection, source: str) -> StoredState | None:
    """``source``'s state, once every source's reads: the file is moved aside for all or none."""
    if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
        with contextlib.closing(sqlite3.connect(MEMORY, isolation_level=None)) as copy:
            conn.backup(copy)  # the file itself is migrated by connect(), in one transaction
            migrate(copy)
            return read_every_source(copy, source)
    sources = [row[0] for row in conn.execute("SELECT source FROM sources")]
    return {s: read(conn, s) for s in sources}.get(source)


def read(conn: sqlite3.Connection, source: str) -> StoredState | None:
    key = (source,)
    sums = conn.execute(
        "SELECT saved_at, overflow_total, buckets_json FROM sources WHERE source = ?", key
    )
    if (saved := sums.fetchone()) is None:
        return None  # never saved
    messages = {}
    for row in conn.execute("SELECT * FROM messages WHERE source = ?", key):
        message = message_from_row(row[1:])
        messages[message.id] = message
    buckets = tuple(float(b) for b in json_list(saved[2]))
    tallies = {}
    for row in conn.execute("SELECT * FROM aggregates WHERE source = ?", key):
        labels, tally = tally_from_row(row[1:])
        tallies[tuple(sorted(labels.items()))] = tally
    registered = conn.execute(
        "SELECT id, labels_json, sent_at, scheduled_at, transactional FROM registered"
        " WHERE source = ?"
        " ORDER BY position",
        key,
    )
    return StoredState(
        messages=MappingProxyType(messages),
        # Keyed by every label saved; restore() sorts them into the label sets in force.
        totals=TotalsSnapshot((), buckets, MappingProxyType(tallies), int(saved[1])),
        saved_at=float(saved[0]),
        registered=tuple(spec_from_row(*row) for row in registered),
    )
