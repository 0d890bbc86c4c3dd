"""Sources: account credits, SMS Partner's bulk-status, and sources coming and going on reload.

Each test runs the real exporter (in process) against the simulator on loopback.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from exporter.app import Exporter, load_runnable
from exporter.config.errors import ConfigErrors
from exporter.simulator import SimulatorServer, World
from tests.conftest import TEST_KEY, FakeClock

SMS_KEY = "sms-key-0d41c7"


@pytest.fixture
def upstream(clock: FakeClock) -> Iterator[SimulatorServer]:
    with SimulatorServer(World(seed=5, clock=clock), api_key=TEST_KEY, sms_api_key=SMS_KEY) as s:
        yield s


def write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def start(path: Path) -> Exporter:
    return Exporter(load_runnable(str(path), demo=False), str(path))


def value(exporter: Exporter, name: str, **labels: str) -> float | None:
    return exporter.registry.get_sample_value(name, labels)


def credits(upstream: SimulatorServer) -> dict[str, Any]:
    answer = requests.get(f"{upstream.url}/me", params={"apiKey": TEST_KEY}, timeout=5).json()
    return dict(answer["credits"])


def test_account_exposes_every_numeric_credit_field_and_its_thresholds(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    upstream.world.send(1000)
    path = write(
        tmp_path / "config.yaml",
        {
            "api": {"base_url": upstream.url, "api_key": TEST_KEY},
            "sources": {"account": {"every": "1m", "low_credits": {"creditMail": 5000}}},
        },
    )
    exporter = start(path)
    assert exporter.poller.poll_all()

    truth = credits(upstream)
    assert truth["currency"] == "EUR"  # not a number: not a series
    numeric = {k: float(v) for k, v in truth.items() if k != "currency"}
    exposed = {
        s.labels["field"]: s.value
        for m in exporter.registry.collect()
        if m.name == "mailpartner_account_credits"
        for s in m.samples
    }
    assert exposed == numeric  # "solde": "489.500" is a number in a string: taken
    assert value(exporter, "mailpartner_account_credits_low_threshold", field="creditMail") == 5000
    assert value(exporter, "mailpartner_account_poll_success") == 1
    assert value(exporter, "mailpartner_api_requests_total", endpoint="me") == 1


def test_a_failing_account_poll_keeps_the_credits_and_counts_the_error(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    path = write(
        tmp_path / "config.yaml",
        {
            "api": {"base_url": upstream.url, "api_key": TEST_KEY},
            "sources": {"account": {"every": "5m"}},
        },
    )
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    account = exporter.sources["account"]
    assert exporter.poller.poll_all()
    before = value(exporter, "mailpartner_account_credits", field="creditMail")
    assert before == 100000

    upstream.faults.reject_key = True
    assert not exporter.poller.poll_all()
    assert value(exporter, "mailpartner_account_credits", field="creditMail") == before
    assert value(exporter, "mailpartner_account_poll_success") == 0
    assert value(exporter, "mailpartner_api_errors_total", endpoint="me", code="10") == 1
    assert value(exporter, "mailpartner_up") == 0
    # Retried after 10 s (±10%), not after the 5-minute interval.
    retry = account.next_due()
    assert retry is not None
    assert 8 <= retry - time.time() <= 11.1

    upstream.faults.reject_key = False
    upstream.world.send(500)
    assert exporter.poller.poll_all()
    assert value(exporter, "mailpartner_account_credits", field="creditMail") == before - 500
    assert value(exporter, "mailpartner_account_poll_success") == 1


def test_smspartner_messages_poll_their_own_api_under_their_own_names(
    upstream: SimulatorServer, tmp_path: Path, clock: FakeClock
) -> None:
    mail = upstream.world.send(300).message_id
    sms = upstream.sms_world.send(200).message_id
    clock.advance(3600)
    path = write(
        tmp_path / "config.yaml",
        {
            "api": {"base_url": upstream.url, "api_key": TEST_KEY},
            "messages": [{"id": mail}],
            "sources": {
                "smspartner_bulk_status": {
                    "api": {"base_url": upstream.sms_url, "api_key": SMS_KEY},
                    "messages": [{"id": sms, "labels": {"campaign": "otp"}}],
                    "message_files": ["sms.d/*.yaml"],
                }
            },
        },
    )
    (tmp_path / "sms.d").mkdir()
    (tmp_path / "sms.d" / "bad.yaml").write_text("- {id: x, labels: {bad-name: 1}}\n")
    exporter = start(path)
    assert exporter.poller.poll_all()
    # SMS Partner's files are counted under its own names.
    assert value(exporter, "smspartner_exporter_message_files") == 1
    assert value(exporter, "smspartner_exporter_message_file_errors_total") == 1
    assert value(exporter, "mailpartner_exporter_message_files") is None

    truth = upstream.sms_world.truth(sms)
    labels = {"message_id": sms, "campaign": "otp"}
    polled = {
        state: value(exporter, "smspartner_message_recipients", **labels, state=state)
        for state in ("delivered", "failed", "pending", "unknown")
    }
    assert polled["delivered"] == truth.statuses.get("Delivered", 0)
    assert sum(v or 0 for v in polled.values()) == 200
    by_status = {
        s.labels["status"]
        for m in exporter.registry.collect()
        if m.name == "smspartner_message_recipients_by_status"
        for s in m.samples
    }
    assert by_status <= {"delivered", "not delivered", "waiting", "ko"}  # SMS Partner's words
    assert value(exporter, "smspartner_message_unsubscribed_recipients", **labels) == (
        truth.unsubscribed
    )
    assert value(exporter, "smspartner_api_requests_total", endpoint="bulk-status") == 1
    assert value(exporter, "smspartner_up") == 1
    # The same aggregates, by campaign, under SMS Partner's names; none under Mail Partner's.
    otp = {"campaign": "otp"}
    assert (
        value(exporter, "smspartner_recipients_total", **otp, state="delivered")
        == (polled["delivered"])
    )
    assert value(exporter, "smspartner_messages_total", **otp) == 1
    delivered = value(exporter, "smspartner_delivery_delay_seconds_count", **otp)
    assert delivered == polled["delivered"]
    assert value(exporter, "mailpartner_messages_total", **otp) is None
    # Each API is asked only about its own messages, with its own key.
    assert upstream.sms_stats().polls == {sms: 1}
    assert upstream.stats().polls == {mail: 1}
    mail_pending = upstream.world.truth(mail).statuses.get("Waiting", 0)
    assert (
        value(exporter, "mailpartner_message_recipients", message_id=mail, state="pending")
        == mail_pending
    )


def test_an_sms_partner_429_pauses_sms_polls_only(
    upstream: SimulatorServer, tmp_path: Path
) -> None:
    mail = upstream.world.send(10).message_id
    sms = upstream.sms_world.send(10).message_id
    path = write(
        tmp_path / "config.yaml",
        {
            "api": {"base_url": upstream.url, "api_key": TEST_KEY},
            "messages": [{"id": mail}],
            "sources": {
                "smspartner_bulk_status": {
                    "api": {"base_url": upstream.sms_url, "api_key": SMS_KEY},
                    "messages": [{"id": sms}],
                }
            },
        },
    )
    exporter = start(path)
    upstream.sms_faults.http_status = 429
    assert not exporter.poller.poll_all()
    sms_source, mail_source = (
        exporter.sources["smspartner_bulk_status"],
        exporter.sources["bulk_status"],
    )
    assert sms_source.upstream is not mail_source.upstream
    assert sms_source.upstream.rate_limited == 1
    assert mail_source.upstream.rate_limited == 0
    assert value(exporter, "smspartner_api_errors_total", endpoint="bulk-status", code="429") == 1
    assert value(exporter, "mailpartner_api_errors_total", endpoint="bulk-status", code="429") == 0
    assert value(exporter, "mailpartner_message_poll_success", message_id=mail) == 1


def test_smspartner_needs_its_own_key(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", {"sources": {"smspartner_bulk_status": {}}})
    with pytest.raises(ConfigErrors) as caught:
        load_runnable(str(path), demo=False, environ={"MAILPARTNER_API_KEY": "k"})
    assert str(caught.value) == (
        f"{path}: sources.smspartner_bulk_status.api: no API key: set"
        " sources.smspartner_bulk_status.api.api_key_file,"
        " sources.smspartner_bulk_status.api.api_key or the SMSPARTNER_API_KEY environment"
        " variable"
    )
    config = load_runnable(
        str(path), demo=False, environ={"MAILPARTNER_API_KEY": "k", "SMSPARTNER_API_KEY": "s"}
    )
    assert config.sources is not None
    (bulk, sms) = config.sources
    assert (bulk.name, sms.name) == ("bulk_status", "smspartner_bulk_status")
    assert sms.settings["api"].base_url == "https://api.smspartner.fr/v1"


def test_sources_come_and_go_on_reload(upstream: SimulatorServer, tmp_path: Path) -> None:
    message = upstream.world.send(50).message_id
    config = {"api": {"base_url": upstream.url, "api_key": TEST_KEY}, "messages": [{"id": message}]}
    path = write(tmp_path / "config.yaml", config)
    exporter = start(path)
    assert exporter.poller.poll_all()
    assert value(exporter, "mailpartner_account_poll_success") is None
    book = exporter.book

    write(path, {**config, "sources": {"account": {"every": "1m"}}})
    assert exporter.reload() is None
    assert exporter.book is book  # bulk_status kept its messages and values
    assert exporter.poller.poll_all()
    assert value(exporter, "mailpartner_account_poll_success") == 1
    assert value(exporter, "mailpartner_message_poll_success", message_id=message) == 1

    write(path, {**config, "sources": {"account": {"every": "never"}}})
    assert (
        exporter.reload()
        == f"{path}: sources.account.every: 'never' is not a duration (use e.g. 30s, 2m, 1h30m, 7d)"
    )
    assert value(exporter, "mailpartner_account_poll_success") == 1  # the old config runs on

    server = exporter.serve("127.0.0.1:0", "/metrics")
    page = f"http://127.0.0.1:{server.server_port}/"
    try:
        assert f"<td>{message}</td>" in requests.get(page, timeout=5).text
        write(path, {**config, "sources": {"bulk_status": {"enabled": False}}})
        assert exporter.reload() is None
        assert value(exporter, "mailpartner_account_poll_success") is None
        assert value(exporter, "mailpartner_message_poll_success", message_id=message) is None
        assert set(exporter.sources) == set()
        assert f"<td>{message}</td>" not in requests.get(page, timeout=5).text  # the page too
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("index", "polled"), [(0, True), (1, False), (2, False)])
def test_only_shard_0_polls_the_account(
    upstream: SimulatorServer, tmp_path: Path, index: int, polled: bool
) -> None:
    path = write(
        tmp_path / "config.yaml",
        {
            "api": {"base_url": upstream.url, "api_key": TEST_KEY},
            "shard": {"count": 3, "index": index},
            "sources": {"account": {"every": "1m"}},
        },
    )
    exporter = start(path)
    assert exporter.poller.poll_all()
    assert upstream.stats().requests.get("me", 0) == (1 if polled else 0)
    credits = value(exporter, "mailpartner_account_credits", field="creditMail")
    assert (credits is not None) == polled  # one set of credit series, so alerts fire once


def test_an_sms_partner_key_typed_into_the_wrong_key_is_not_quoted_back(tmp_path: Path) -> None:
    path = write(
        tmp_path / "config.yaml",
        {
            "api": {"api_key": TEST_KEY},
            "sources": {
                "smspartner_bulk_status": {"api": {"api_key": SMS_KEY, "timeout": SMS_KEY}}
            },
        },
    )
    with pytest.raises(ConfigErrors) as caught:
        load_runnable(str(path), demo=False)
    assert str(caught.value) == (
        f"{path}: sources.smspartner_bulk_status.api.timeout: '<redacted>' is not a duration"
        " (use e.g. 30s, 2m, 1h30m, 7d)"
    )
