"""State across restarts: totals continue, final messages stay final, nothing is lost."""

from __future__ import annotations

import dataclasses
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from exporter.client import BULK_STATUS
from exporter.config.model import PollingConfig
from exporter.domain import MessageSpec, State
from exporter.poller import Poller
from exporter.simulator import Faults, SimulatorServer, World
from exporter.sources.bulk_status import BulkStatusSource
from exporter.state import StateStore
from exporter.stats import RequestStats
from tests.conftest import TEST_KEY, FakeClock, bulk_status_poller, make_client, make_config
from tests.stack import start_exporter, wait_until

HOUR = 3600.0


@pytest.fixture
def upstream() -> Iterator[SimulatorServer]:
    with SimulatorServer(World(seed=21), api_key=TEST_KEY) as server:
        yield server


def once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", "--once", "--config.file", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def sample(exposition: str, line_start: str) -> float:
    return float(
        next(line for line in exposition.splitlines() if line.startswith(line_start)).rsplit(
            " ", 1
        )[1]
    )


@pytest.mark.e2e
def test_totals_continue_and_final_messages_are_not_polled_again(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    old = upstream.world.send(300, sent_at=upstream.world.clock() - 72 * HOUR)
    young = upstream.world.send(300)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": upstream.url, "api_key": TEST_KEY},
                "state": {"path": str(tmp_path / "state.db")},
                "messages": [
                    {"id": old.message_id, "sent_at": old.sent_at},
                    {"id": young.message_id},
                ],
            }
        )
    )

    first = once(config)
    assert first.returncode == 0, first.stderr
    second = once(config)
    assert second.returncode == 0, second.stderr

    assert upstream.stats().polls == {old.message_id: 1, young.message_id: 2}
    assert sample(second.stdout, f'mailpartner_message_final{{message_id="{old.message_id}"}}') == 1
    # Each recipient counted once over both runs: the totals equal what the messages show now.
    for state in ("delivered", "failed"):
        shown = sum(
            sample(
                second.stdout, f'mailpartner_message_recipients{{message_id="{m}",state="{state}"}}'
            )
            for m in (old.message_id, young.message_id)
        )
        total = f'mailpartner_recipients_total{{campaign="",state="{state}"}}'
        assert sample(second.stdout, total) == shown
    assert "state restored" in second.stderr


@pytest.mark.e2e
def test_sigterm_saves_state_and_exits_quickly(upstream: SimulatorServer, tmp_path: Path) -> None:
    send = upstream.world.send(100)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": upstream.url, "api_key": TEST_KEY},
                "state": {"path": "state.db"},
                "messages": [{"id": send.message_id}],
            }
        )
    )
    process = start_exporter(tmp_path, "--config.file", str(config), cwd=tmp_path)
    wait_until(
        lambda: (
            "mailpartner_message_poll_success"
            in requests.get(f"{process.url}/metrics", timeout=5).text
        ),
        10,
        "a poll",
    )
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(10) == 0
    process.stop()
    stored = StateStore(str(tmp_path / "state.db"), source="bulk_status").load()
    assert stored is not None and set(stored.messages) == {send.message_id}


@pytest.mark.e2e
def test_a_corrupt_state_file_is_moved_aside_and_startup_goes_on(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    send = upstream.world.send(10)
    (tmp_path / "state.db").write_bytes(b"not a database at all" * 100)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": upstream.url, "api_key": TEST_KEY},
                "state": {"path": str(tmp_path / "state.db")},
                "messages": [{"id": send.message_id}],
            }
        )
    )
    result = once(config)
    assert result.returncode == 0
    assert "is corrupt" in result.stderr and "moved aside" in result.stderr
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.glob("state.db.corrupt-*")] == [
        "state.db"
    ]


def test_soak_with_faults_and_a_restart_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """Two simulated days on a fake clock, faults at random, one restart in the middle: every
    message ends exactly at the simulator's ground truth, and the totals at their sums."""
    clock = FakeClock()
    rng = random.Random(7)
    faults = [
        Faults(http_status=500),
        Faults(http_status=502),
        Faults(invalid_body=True),
        Faults(error_code=429),
        Faults(reject_key=True),
        Faults(error_code=99),
    ]
    with SimulatorServer(World(seed=8, clock=clock), api_key=TEST_KEY) as upstream:
        specs = [
            MessageSpec(
                upstream.world.send(
                    rng.randrange(50, 400), sent_at=clock() - rng.uniform(0, 3 * HOUR)
                ).message_id,
                sent_at=None,
            )
            for _ in range(15)
        ]
        # The shipped schedule (28 polls a life), so two days cost hundreds of requests.
        config = dataclasses.replace(
            make_config(upstream.url, *specs),
            polling=PollingConfig(),
            state_path=str(tmp_path / "state.db"),
        )

        def start() -> tuple[BulkStatusSource, Poller]:
            client = make_client(config, RequestStats([BULK_STATUS]))
            return bulk_status_poller(config, client, clock)

        source, poller = start()
        for minute in range(52 * 60):
            if minute == 24 * 60:  # restart: save, drop everything, come back from the file
                source.save(clock())
                source.close()
                source, poller = start()
            upstream.faults = rng.choice(faults) if rng.random() < 0.3 else Faults()
            poller.run_pending()
            clock.advance(60)
        upstream.faults = Faults()
        for _ in range(3 * 60):  # a quiet end: failed last polls get their retries
            poller.run_pending()
            clock.advance(60)

        book = source.book
        messages, totals = book.snapshot()
        assert len(messages) == len(specs) and all(m.phase == "final" for m in messages)
        expected = {state: 0 for state in State}
        expected_cost = 0.0
        for message in messages:
            truth = upstream.world.truth(message.spec.id)
            assert message.aggregate is not None
            assert dict(message.aggregate.statuses) == {
                k.lower(): v for k, v in truth.statuses.items()
            }
            assert message.aggregate.cost == pytest.approx(truth.cost, abs=1e-9)
            for state, count in message.aggregate.states.items():
                expected[state] += count
            expected_cost += message.aggregate.cost
        for state in (State.DELIVERED, State.FAILED, State.UNKNOWN):
            assert totals.recipients[state] == expected[state], state
        assert totals.cost == pytest.approx(expected_cost, abs=1e-9)
