"""The state file: what survives a restart, and what happens to files that are not ours."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from exporter.aggregate import OTHER_STATUS, MessageAggregate
from exporter.domain import MessageSpec, State
from exporter.state import MEMORY, StateStore, StoredMessage, StoredState
from exporter.totals import Tally, TotalsSnapshot
from exporter.tracked import Phase
from tests.conftest import START, FakeClock

REPO = Path(__file__).parent.parent
STAMP = "20261126T100000Z"  # START, as moved-aside files are named
VOLATILE = "state is kept in memory only and will not survive a restart"
MAIL = "bulk_status"
SMS = "smspartner_bulk_status"


def aggregate(n: int, pending: int = 0) -> MessageAggregate:
    """A message of ``n + pending`` recipients at 0.0105 each, as the API bills them."""
    failed = n // 7
    states = {State.DELIVERED: n - failed, State.FAILED: failed, State.PENDING: pending}
    statuses = {"delivered": n - failed, "not delivered": failed, OTHER_STATUS: 0}
    if pending:
        statuses["waiting"] = pending
    return MessageAggregate(
        states=MappingProxyType({**dict.fromkeys(State, 0), **states}),
        statuses=MappingProxyType(statuses),
        cost=0.0105 * (n + pending),
        unsubscribed=n // 50,
        last_report=START + n + 0.25,
        delays=(n // 2, n - n // 2 - failed, 0, 0),
        delay_sum=n * 30.5,
    )


BUCKETS = (1.0, 60.0, 3600.0)


def totals(recipients: dict[State, int], cost: float, **labels: str) -> TotalsSnapshot:
    """Counters of one label set, with a delay histogram over ``BUCKETS``."""
    tally = Tally(
        {**dict.fromkeys(State, 0), **recipients},
        cost,
        unsubscribed=recipients.get(State.DELIVERED, 0) // 50,
        messages=7,
        delays=[1, 2, 3, recipients.get(State.DELIVERED, 0)],
        delay_sum=1234.5,
    )
    return TotalsSnapshot((), BUCKETS, {tuple(sorted(labels.items())): tally}, overflow=2)


def big_state(k: int, base: int = 3000) -> StoredState:
    """State number ``k``: every field, and the number of messages, tell ``k`` apart."""
    phases = list(Phase)
    messages = {}
    for i in range(base + 500 * (k % 4)):
        phase = phases[i % 3]
        messages[f"m{i}"] = StoredMessage(
            id=f"m{i}",
            first_seen=START + k + i / 8,
            phase=phase,
            final_at=START + k + 0.5 if phase == Phase.FINAL else None,
            last_success=None if i % 5 == 0 else START + k,
            aggregate=None if i % 5 == 0 else aggregate(i + k, pending=i % 2),
        )
    return StoredState(
        messages=messages,
        totals=totals({s: k * 1000 + n for n, s in enumerate(State)}, 0.0105 * k),
        saved_at=START + k,
        registered=tuple(
            MessageSpec(f"r{k}-{i}", MappingProxyType({"k": str(k)}), START + k)
            for i in range(1 + k % 3)
        ),
    )


def realistic_state() -> StoredState:
    messages = [
        StoredMessage("300", START, Phase.ACTIVE, None, None, None),  # not polled yet
        StoredMessage("301", START + 1, Phase.ACTIVE, None, START + 30, aggregate(40, 60)),
        StoredMessage("302", START + 2, Phase.SETTLED, None, START + 95.5, aggregate(1234)),
        StoredMessage("303", START - 9, Phase.FINAL, START + 7200, START + 7200, aggregate(7)),
        StoredMessage("304", START - 9, Phase.FINAL, START + 3.25, None, None),  # gave up
        StoredMessage("ünï-305", START, Phase.SETTLED, None, START + 60, aggregate(0, 0)),
    ]
    return StoredState(
        messages={m.id: m for m in messages},
        totals=totals(
            {State.DELIVERED: 1101, State.FAILED: 180, State.PENDING: 60, State.UNKNOWN: 3},
            sum(m.aggregate.cost for m in messages if m.aggregate) + 0.0105 * 3,
            campaign="newsletter",
        ),
        saved_at=START + 7300.125,
    )


def sms_state() -> StoredState:
    """SMS Partner's state: a message ID that Mail Partner's state has too, other values."""
    messages = [
        StoredMessage("301", START + 4, Phase.FINAL, START + 600, START + 600, aggregate(3)),
        StoredMessage("sms-9", START + 5, Phase.ACTIVE, None, None, None),
    ]
    return StoredState(
        messages={m.id: m for m in messages},
        totals=totals({State.DELIVERED: 3}, 0.0315),
        saved_at=START + 650.5,
        registered=(MessageSpec("sms-9", MappingProxyType({"campaign": "rappel"}), START + 5),),
    )


def reopen(path: Path, source: str = MAIL) -> tuple[StoredState | None, str | None]:
    store = StateStore(str(path), source=source)
    try:
        return store.load(), store.problem
    finally:
        store.close()


def test_round_trip_keeps_every_field_exactly(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(str(path), source=MAIL)
    assert store.load() is None
    assert store.problem is None
    state = realistic_state()
    store.save(state)
    store.close()

    loaded, problem = reopen(path)
    assert problem is None
    assert loaded == state
    assert loaded is not None
    assert loaded.totals.cost == state.totals.cost  # exact: REAL round-trips every bit
    assert loaded.messages["302"].aggregate == state.messages["302"].aggregate  # with delays
    assert [m.aggregate.cost for m in loaded.messages.values() if m.aggregate] == [
        m.aggregate.cost for m in state.messages.values() if m.aggregate
    ]
    assert loaded.messages["301"].aggregate is not None
    assert loaded.messages["301"].aggregate.statuses[OTHER_STATUS] == 0
    assert {m.phase for m in loaded.messages.values()} == {"active", "settled", "final"}
    assert all(Phase(m.phase) for m in loaded.messages.values())


def test_memory_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = StateStore(MEMORY, source=MAIL)
    store.save(realistic_state())
    assert store.load() is None
    assert store.problem is None
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_a_save_replaces_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = realistic_state()
    store = StateStore(str(path), source=MAIL)
    store.load()
    store.save(first)
    kept = {k: v for k, v in first.messages.items() if k != "302"}
    kept["303"] = StoredMessage("303", START - 9, Phase.FINAL, START + 7300, START + 7300, None)
    second = StoredState(kept, totals(dict.fromkeys(State, 1), 0.0105 * 3), START + 9000)
    store.save(second)
    assert store.load() == second  # a second load reads what this store wrote
    store.close()

    loaded, _ = reopen(path)
    assert loaded == second
    assert loaded is not None
    assert "302" not in loaded.messages


def test_a_new_empty_file_is_a_fresh_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.touch()
    assert reopen(path) == (None, None)
    assert reopen(path) == (None, None)  # created, never saved: still nothing, no problem


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(20_000))
    Path(f"{path}-wal").write_bytes(b"stale companion")  # must go with it, not be replayed


def _short_header(path: Path) -> None:
    _saved(path)
    path.write_bytes(path.read_bytes()[:60])


def _truncated(path: Path) -> None:
    _saved(path)
    os.truncate(path, path.stat().st_size // 2)


def _saved(path: Path) -> None:
    store = StateStore(str(path), source=MAIL)
    store.save(big_state(1, base=2000))
    store.close()


def _foreign_tables(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript("CREATE TABLE contacts (email TEXT); CREATE TABLE invoices (n INT);")
    conn.close()


def _foreign_application_id(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript("PRAGMA application_id = 305419896; CREATE TABLE messages (id);")
    conn.close()


def _bad_row(path: Path) -> None:
    _saved(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE messages SET phase = 'paused' WHERE id = 'm3'")
    conn.close()


def _bad_row_of_another_source(path: Path) -> None:
    store = StateStore(str(path), source=SMS)
    store.save(sms_state())
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE messages SET phase = 'paused' WHERE id = 'sms-9'")
    conn.close()


def _newer_schema(path: Path) -> None:
    _saved(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 5")
    conn.close()


@pytest.mark.parametrize(
    ("make", "kind", "what"),
    [
        (_random_bytes, "corrupt", re.escape("is corrupt (not an SQLite database)")),
        (_short_header, "corrupt", re.escape("is corrupt (truncated header)")),
        (_truncated, "corrupt", r"is corrupt \(.+\)"),  # in SQLite's words, which vary
        (
            _bad_row,
            "corrupt",
            re.escape("is corrupt (unreadable data: message m3: unknown phase 'paused')"),
        ),
        (
            _bad_row_of_another_source,
            "corrupt",
            re.escape("is corrupt (unreadable data: message sms-9: unknown phase 'paused')"),
        ),
        (
            _foreign_tables,
            "foreign",
            re.escape(
                "belongs to another application (application_id 0x0, tables: contacts, invoices)"
            ),
        ),
        (
            _foreign_application_id,
            "foreign",
            re.escape(
                "belongs to another application (application_id 0x12345678, tables: messages)"
            ),
        ),
        (
            _newer_schema,
            "newer",
            re.escape("was written by a newer exporter (schema version 5, this one reads up to 4)"),
        ),
    ],
    ids=[
        "random-bytes",
        "short-header",
        "truncated",
        "bad-row",
        "other-source-bad-row",
        "foreign-tables",
        "foreign-id",
        "newer",
    ],
)
def test_a_file_that_is_not_ours_is_moved_aside(
    tmp_path: Path, clock: FakeClock, make: Callable[[Path], None], kind: str, what: str
) -> None:
    path = tmp_path / "state.db"
    make(path)
    original = path.read_bytes()
    store = StateStore(str(path), source=MAIL, clock=clock)
    assert store.load() is None
    moved = Path(f"{path}.{kind}-{STAMP}")
    expected = re.escape(f"state file {path} ") + what + re.escape(f"; moved aside to {moved}")
    assert re.fullmatch(expected, store.problem or ""), store.problem
    assert moved.read_bytes() == original
    if make is _random_bytes:
        assert Path(f"{moved}-wal").read_bytes() == b"stale companion"

    store.save(realistic_state())  # a working, empty store took its place
    store.close()
    assert reopen(path) == (realistic_state(), None)


def test_two_sources_share_a_file_without_touching_each_other(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    mail, sms = StateStore(str(path), source=MAIL), StateStore(str(path), source=SMS)
    assert mail.load() is None
    assert sms.load() is None
    mail.save(realistic_state())
    sms.save(sms_state())
    assert reopen(path) == (realistic_state(), None)
    assert reopen(path, SMS) == (sms_state(), None)

    fewer = dataclasses.replace(
        realistic_state(), messages={"301": sms_state().messages["301"]}, saved_at=START + 9000
    )
    mail.save(fewer)  # both stores still open
    assert mail.load() == fewer
    assert sms.load() == sms_state()
    mail.close()
    sms.close()
    assert reopen(path) == (fewer, None)
    assert reopen(path, SMS) == (sms_state(), None)
    assert reopen(path, "another_source") == (None, None)


def test_registered_messages_survive_in_order(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    registered = (
        MessageSpec("r-20", MappingProxyType({"campaign": "Noël", "team": "crm"}), START - 60.5),
        MessageSpec("r-3"),  # no labels, no sent_at
        MessageSpec("r-100", MappingProxyType({"z": "last", "a": "first"}), START),
    )
    store = StateStore(str(path), source=MAIL)
    store.load()
    store.save(dataclasses.replace(realistic_state(), registered=registered))
    store.close()

    loaded, problem = reopen(path)
    assert problem is None
    assert loaded == dataclasses.replace(realistic_state(), registered=registered)
    assert [m.id for m in loaded.registered] == ["r-20", "r-3", "r-100"]
    assert list(loaded.registered[2].labels) == ["z", "a"]

    store = StateStore(str(path), source=MAIL)
    store.load()
    store.save(dataclasses.replace(realistic_state(), registered=registered[:0:-1]))
    store.close()
    loaded, _ = reopen(path)
    assert loaded is not None
    assert loaded.registered == (registered[2], registered[1])


def test_rows_of_an_unknown_source_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    other = StateStore(str(path), source="fax_status")
    other.load()
    other.save(sms_state())
    other.close()
    with sqlite3.connect(path) as conn:  # rows of a source never saved: not read
        conn.execute("INSERT INTO aggregates VALUES ('telex', '{}', '{}', 5, 0, 0, '[]', 0)")
    conn.close()

    assert reopen(path) == (None, None)
    store = StateStore(str(path), source=MAIL)
    store.load()
    store.save(realistic_state())
    store.close()
    assert reopen(path) == (realistic_state(), None)
    assert reopen(path, "fax_status") == (sms_state(), None)


def test_moving_aside_twice_in_one_second_keeps_both(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    for n in (1, 2):
        path.write_bytes(b"junk %d" % n * 50)
        store = StateStore(str(path), source=MAIL, clock=clock)
        store.load()
        store.close()
    assert Path(f"{path}.corrupt-{STAMP}").read_bytes() == b"junk 1" * 50
    assert Path(f"{path}.corrupt-{STAMP}-2").read_bytes() == b"junk 2" * 50


def _unusable_paths(tmp_path: Path) -> list[tuple[Path, str]]:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-dir.db").mkdir()
    cases = [
        (
            tmp_path / "missing" / "state.db",
            f"state directory {tmp_path / 'missing'} does not exist",
        ),
        (
            tmp_path / "a-file" / "state.db",
            f"state directory {tmp_path / 'a-file'} is not a directory",
        ),
        (tmp_path / "a-dir.db", f"state file {tmp_path / 'a-dir.db'} cannot be read ("),
    ]
    if Path("/proc/self").is_dir():  # even root cannot create files there
        cases.append((Path("/proc/state.db"), "state file /proc/state.db cannot be written ("))
    return cases


def test_an_unusable_path_degrades_to_memory(tmp_path: Path) -> None:
    for path, start in _unusable_paths(tmp_path):
        store = StateStore(str(path), source=MAIL)
        assert store.load() is None
        assert store.problem is not None
        assert store.problem.startswith(start), store.problem
        assert store.problem.endswith(VOLATILE)
        store.save(realistic_state())
        assert store.load() is None
        store.close()


def test_an_unwritable_directory_degrades_to_memory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories (see /proc in the test above)")
    directory = tmp_path / "ro"
    directory.mkdir(mode=0o555)
    try:
        store = StateStore(str(directory / "state.db"), source=MAIL)
        assert store.load() is None
        assert store.problem == f"state directory {directory} is not writable; {VOLATILE}"
        store.save(realistic_state())
        store.close()
    finally:
        directory.chmod(0o755)


def test_saves_from_another_thread(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "state.db"), source=MAIL)
    assert store.load() is None
    poll_loop = threading.Thread(target=store.save, args=(realistic_state(),))
    poll_loop.start()
    poll_loop.join()
    assert store.load() == realistic_state()
    store.close()
    store.save(realistic_state())  # after close: ignored, no error


# The child saves the pickled state and stops where told (at the n-th statement after BEGIN
# IMMEDIATE, before COMMIT, or once save has returned), says so, and waits for its SIGKILL.
# A page cache of four pages makes SQLite write the open transaction's pages into the -wal
# before COMMIT, as a save bigger than the cache does: the kill leaves half a save on disk.
_CHILD = """
import os, pickle, signal, sqlite3, sys
from exporter.state import StateStore

path, pickled, where = sys.argv[1:]
signal.alarm(30)  # ends itself should the parent never kill it
with open(pickled, "rb") as f:
    state = pickle.load(f)
armed = in_save = False
statements = 0

def stop(at):
    print("stopped", at, flush=True)
    sys.stdin.read()
    os._exit(1)

def trace(sql):
    global in_save, statements
    if armed and sql.startswith("BEGIN"):
        in_save, statements = True, 0
    elif in_save:
        statements += 1
        if sql == "COMMIT" and where == "COMMIT":
            stop(f"before COMMIT, {statements - 1} statements into the save")
        elif sql == "COMMIT" and where.isdigit():
            print("committed before statement", where, flush=True)
            os._exit(2)
        elif where == str(statements):
            stop(f"at statement {statements} of the save: {sql[:32]}")

connect = sqlite3.connect
def traced(*args, **kwargs):
    conn = connect(*args, **kwargs)
    conn.execute("PRAGMA cache_size = 4")
    conn.set_trace_callback(trace)
    return conn
sqlite3.connect = traced

store = StateStore(path, source="bulk_status")
store.load()
armed = True
store.save(state)
stop("after save returned")
"""
KILL_BASE = 200  # messages in the kill test's states: 200 to 1,700


class _PlainPickler(pickle.Pickler):
    """Pickles read-only mappings as dicts (which compare equal), so the child needs no
    more than the exporter to read them."""

    def reducer_override(self, obj: object) -> Any:
        if type(obj) is MappingProxyType:
            return dict, (dict(obj),)
        return NotImplemented


def _wal_frames(path: Path) -> tuple[int, int]:
    """The -wal's frames of its current generation: how many up to the last commit frame,
    and how many written after it, uncommitted.

    A frame's header holds its page number, the database size (on commit frames only),
    then the salts of its generation and a checksum; an open transaction that has rewritten
    one of its own frames leaves those 16 bytes zero in its later ones until COMMIT.
    """
    wal = Path(f"{path}-wal")
    data = wal.read_bytes() if wal.exists() else b""
    if len(data) < 32:
        return 0, 0
    frame_size = 24 + int.from_bytes(data[8:12], "big")
    frames = committed = 0
    for offset in range(32, len(data) - frame_size + 1, frame_size):
        header = data[offset : offset + 24]
        if header[8:16] != data[16:24] and header[8:24] != bytes(16):
            break  # a frame of an earlier generation, past the end of this one
        frames += 1
        if int.from_bytes(header[4:8], "big"):  # the database size, on commit frames only
            committed = frames
    return committed, frames - committed


def _kill_while_saving(path: Path, state: StoredState, where: str) -> tuple[str, int, int]:
    """SIGKILL a child saving ``state`` where it stopped: what it said, and the -wal's
    committed and uncommitted frames it left."""
    pickled = path.with_suffix(".pickle")
    with pickled.open("wb") as f:
        _PlainPickler(f).dump(state)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(pickled), where],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        said = child.stdout.readline().strip()
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
    assert said.startswith("stopped"), (where, said)
    assert child.returncode == -signal.SIGKILL, (where, said, child.returncode)
    return (said, *_wal_frames(path))


# Where each child stops, for a state of n messages. After BEGIN IMMEDIATE a save runs:
# DELETE messages, n INSERTs, DELETE totals, 4 INSERTs, DELETE registered, an INSERT for
# each, the sources row, COMMIT. Were that to change, any n-th before COMMIT is still inside.
_STOPS: list[Callable[[int], str]] = [
    lambda n: "1",  # the write lock taken, nothing changed yet
    lambda n: str(n // 2),  # the messages deleted, about half written back
    lambda n: "returned",  # a whole save, which the kills after it must keep
    lambda n: str(n + 2),  # every message written, the totals untouched
    lambda n: str(n + 8),  # the totals written, the registered messages deleted
    lambda n: "COMMIT",  # every row written, none committed
]


@pytest.mark.e2e
def test_a_kill_during_save_leaves_one_whole_state(tmp_path: Path) -> None:
    """SIGKILL a process at each step of a save: the file holds the last whole state saved
    before it; or, killed once save has returned, the new one."""
    path = tmp_path / "state.db"
    store = StateStore(str(path), source=MAIL)
    store.save(big_state(0, base=KILL_BASE))
    store.close()
    whole = 0
    kills = []
    for k, stop in enumerate(_STOPS, start=1):
        state = big_state(k, base=KILL_BASE)
        where = stop(len(state.messages))
        said, committed, uncommitted = _kill_while_saving(path, state, where)

        loaded, problem = reopen(path)
        assert problem is None
        assert loaded is not None
        got = round(loaded.saved_at - START)
        kills.append(f"{said}: -wal frames {committed} committed, {uncommitted} not; got {got}")
        assert loaded == big_state(got, base=KILL_BASE)  # every row of one state
        if where == "returned":
            assert (got, uncommitted) == (k, 0)
            whole = k
        else:
            assert got == whole
            # The first statement has not run yet; after it, the save's pages are on disk.
            assert (uncommitted > 0) is (where != "1"), said
    print("\nkills:\n" + "\n".join(kills))


def test_saving_ten_thousand_messages(tmp_path: Path) -> None:
    state = big_state(0, base=10_000)
    store = StateStore(str(tmp_path / "state.db"), source=MAIL)
    store.load()
    store.save(state)  # the first save creates the pages; the steady state rewrites them
    began = time.perf_counter()
    store.save(state)
    took = time.perf_counter() - began
    store.close()
    print(f"\nsaving {len(state.messages)} messages took {took * 1000:.0f} ms")
    assert reopen(tmp_path / "state.db") == (state, None)


# What version 2 of the state file (the first release's) created, verbatim: its unlabelled
# totals and message rows must come through the migration exactly.
V2_SCHEMA = """
CREATE TABLE sources (source TEXT PRIMARY KEY, cost_total REAL NOT NULL, saved_at REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE messages (
    source TEXT NOT NULL, id TEXT NOT NULL, first_seen REAL NOT NULL, phase TEXT NOT NULL,
    final_at REAL, last_success REAL, states_json TEXT, statuses_json TEXT, cost REAL,
    unsubscribed INTEGER, last_report REAL, PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE TABLE totals (
    source TEXT NOT NULL, state TEXT NOT NULL, recipients INTEGER NOT NULL,
    PRIMARY KEY (source, state)
) WITHOUT ROWID;
CREATE TABLE registered (
    source TEXT NOT NULL, position INTEGER NOT NULL, id TEXT NOT NULL, labels_json TEXT NOT NULL,
    sent_at REAL, PRIMARY KEY (source, position)
) WITHOUT ROWID;
PRAGMA application_id = 1297106264;
PRAGMA user_version = 2;
"""


def test_a_version_2_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(V2_SCHEMA)
    with conn:
        conn.execute("INSERT INTO sources VALUES ('bulk_status', 12.9885, ?)", (START + 7300,))
        conn.executemany(
            "INSERT INTO totals VALUES ('bulk_status', ?, ?)",
            [("delivered", 1101), ("failed", 180), ("pending", 0), ("unknown", 3)],
        )
        conn.execute(
            "INSERT INTO messages VALUES ('bulk_status', '302', ?, 'settled', NULL, ?, ?, ?,"
            " 12.957, 24, ?)",
            (
                START + 2,
                START + 95.5,
                '{"delivered": 1058, "failed": 176, "pending": 0, "unknown": 0}',
                '{"delivered": 1058, "not delivered": 176}',
                START + 1236.25,
            ),
        )
        conn.execute("INSERT INTO registered VALUES ('bulk_status', 0, '302', '{}', NULL)")
    conn.close()

    loaded, problem = reopen(path)
    assert problem is None and loaded is not None
    # The unlabelled totals are the empty label set's, with no delays counted yet.
    assert loaded.totals.recipients == {
        State.DELIVERED: 1101,
        State.FAILED: 180,
        State.PENDING: 0,
        State.UNKNOWN: 3,
    }
    assert loaded.totals.cost == 12.9885
    assert list(loaded.totals.tallies) == [()]
    settled = loaded.messages["302"].aggregate
    assert settled is not None and settled.states[State.DELIVERED] == 1058
    assert settled.delays == () and settled.cost == 12.957
    assert [spec.id for spec in loaded.registered] == ["302"]

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (4,)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
    assert tables == {"sources", "messages", "aggregates", "registered"}
    conn.close()
    assert not list(tmp_path.glob("state.db.*"))  # migrated, not moved aside
    assert reopen(path) == (loaded, None)  # and read again as version 4


def test_a_version_3_file_is_migrated_and_keeps_its_registrations(tmp_path: Path) -> None:
    """Version 4 added the registrations' ``scheduled_at`` and ``transactional``, and the
    messages' ``first_report``; a version 3 file is migrated in place."""
    path = tmp_path / "state.db"
    deferred = MessageSpec("900", MappingProxyType({"campaign": "later"}), START, START + 3600)
    store = StateStore(str(path), source=MAIL)
    store.save(dataclasses.replace(big_state(1, base=2000), registered=(deferred,)))
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:  # as version 3 wrote it
        conn.execute("ALTER TABLE registered DROP COLUMN scheduled_at")
        conn.execute("ALTER TABLE registered DROP COLUMN transactional")
        conn.execute("ALTER TABLE messages DROP COLUMN first_report")
        conn.execute("PRAGMA user_version = 3")
        conn.commit()

    loaded, problem = reopen(path)
    assert problem is None and loaded is not None
    assert loaded.registered == (MessageSpec("900", deferred.labels, START),)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)

    store = StateStore(str(path), source=MAIL)
    store.load()
    store.save_registrations({"900": deferred})
    store.close()
    loaded, _ = reopen(path)
    assert loaded is not None and loaded.registered == (deferred,)
