"""The state file: what survives a restart, and what happens to files that are not ours."""

from __future__ import annotations

import dataclasses
import os
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

import pytest

from exporter.aggregate import OTHER_STATUS, MessageAggregate
from exporter.domain import MessageSpec, State
from exporter.state import MEMORY, StateStore, StoredMessage, StoredState
from exporter.tracker import Phase
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
    )


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
        recipients_total={s: k * 1000 + n for n, s in enumerate(State)},
        cost_total=sum(0.0105 * i for i in range(k + 1)),
        saved_at=START + k,
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
        recipients_total={
            State.DELIVERED: 1101,
            State.FAILED: 180,
            State.PENDING: 60,
            State.UNKNOWN: 3,
        },
        cost_total=sum(m.aggregate.cost for m in messages if m.aggregate) + 0.0105 * 3,
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
        recipients_total={**dict.fromkeys(State, 0), State.DELIVERED: 3},
        cost_total=0.0315,
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
    assert loaded.cost_total == state.cost_total  # exact: REAL round-trips every bit
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
    second = StoredState(kept, dict.fromkeys(State, 1), 0.0105 * 3, START + 9000)
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
    conn.execute("PRAGMA user_version = 3")
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
            re.escape("was written by a newer exporter (schema version 3, this one reads up to 2)"),
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
        conn.execute("INSERT INTO totals VALUES ('telex', 'delivered', 5)")
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


_CHILD = """
import itertools, sys, time
from exporter.state import StateStore
from tests.test_state import big_state
store = StateStore(sys.argv[1], source="bulk_status")
assert store.load() is None or store.problem is None, store.problem
took = 0.0
for k in itertools.count(int(sys.argv[2])):
    state = big_state(k)
    print(k, took, flush=True)
    began = time.perf_counter()
    store.save(state)
    took = time.perf_counter() - began
"""


def test_a_kill_during_save_leaves_one_whole_state(tmp_path: Path) -> None:
    """SIGKILL a process that saves in a loop: the file holds a state it wrote, whole."""
    path = tmp_path / "state.db"
    rng = random.Random(3)
    outcomes = []
    for round_ in range(6):
        start = round_ * 10
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(start)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        started = [child.stdout.readline().split() for _ in range(3)]  # two saves done
        assert [int(k) for k, _ in started] == [start, start + 1, start + 2]
        # Kill somewhere in the third save, or just after it: where is the point of the test.
        time.sleep(rng.uniform(0.0, 1.5 * float(started[-1][1])))
        child.send_signal(signal.SIGKILL)
        child.wait()
        last = [start + 2, *(int(line.split()[0]) for line in child.stdout)][-1]
        child.stdout.close()

        loaded, problem = reopen(path)
        assert problem is None
        assert loaded is not None
        k = round(loaded.saved_at - START)
        assert k in (last - 1, last)  # every finished save is there, nothing half-written
        assert loaded == big_state(k)
        outcomes.append("lost the save under way" if k < last else "after the save")
    print("\nkills:", {o: outcomes.count(o) for o in set(outcomes)})


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
