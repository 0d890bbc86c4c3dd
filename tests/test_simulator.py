"""The simulated Mail Partner API, over real loopback sockets and with an injected clock."""

from __future__ import annotations

import datetime as dt
import itertools
import re
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from exporter import calendar
from exporter.calendar import PARIS
from exporter.config.model import Config
from exporter.demo import Demo
from exporter.domain import MessageSpec
from exporter.simulator import (
    DemoCampaign,
    Faults,
    RecipientReport,
    SimulatedSend,
    SimulatorServer,
    World,
)
from exporter.simulator.cli import describe, parse_args
from exporter.simulator.demo import KEEP, MAX_RECIPIENTS, TRANSACTIONAL, quiet_time_before
from exporter.simulator.model import AlreadyCancelled, NotCancellable, TooLateToCancel
from tests.conftest import START, TEST_KEY, FakeClock

Serve = Callable[..., SimulatorServer]

KEY = TEST_KEY
T0 = START
HOURS_48 = 48 * 3600


@pytest.fixture
def world(clock: FakeClock) -> World:
    return World(seed=7, clock=clock)


@pytest.fixture
def serve(world: World) -> Iterator[Serve]:
    servers: list[SimulatorServer] = []

    def start(**options: Any) -> SimulatorServer:
        server = SimulatorServer(world, api_key=KEY, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(serve: Serve) -> SimulatorServer:
    return serve()


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


def get(
    http: requests.Session, server: SimulatorServer, path: str, **params: str
) -> requests.Response:
    return http.get(f"{server.url}/{path}", params=params, timeout=5)


def xml_values(element: ET.Element) -> Any:
    """A keyless XML document as nested lists of stripped strings."""
    children = list(element)
    return [xml_values(c) for c in children] if children else (element.text or "").strip()


def tally(reports: Iterator[RecipientReport]) -> Counter[str]:
    return Counter(report.status for report in reports)


# --- the world: how reports evolve ---------------------------------------------------------


def test_recipients_start_waiting_then_settle_within_48_hours(
    world: World, clock: FakeClock
) -> None:
    sent = world.send(2000, campaign="newsletter")

    at_send = list(world.reports(sent.message_id))
    assert {r.status for r in at_send} == {"Waiting"}
    assert {r.date for r in at_send} == {int(T0)}

    clock.advance(60)
    after_a_minute = tally(world.reports(sent.message_id))
    assert 0 < after_a_minute["Waiting"] < 0.3 * 2000
    assert after_a_minute["Delivered"] > 0.6 * 2000

    clock.advance(HOURS_48)
    settled = list(world.reports(sent.message_id))
    statuses = tally(iter(settled))
    assert "Waiting" not in statuses
    assert 0.9 * 2000 < statuses["Delivered"] < 0.96 * 2000
    assert 0.03 * 2000 < statuses["Not delivered"] < 0.09 * 2000
    assert set(statuses) - {"Delivered", "Not delivered"}, "rare statuses must show up"
    assert max(r.date for r in settled) <= T0 + HOURS_48
    assert max(r.date for r in settled) > T0 + 3600, "some reports take hours"
    assert 0 < sum(r.stop_mail for r in settled) < 0.04 * 2000


def test_report_fields(world: World) -> None:
    sent = world.send(3, sent_at=T0 - 10, cost_per_recipient=0.02)
    reports = list(world.reports(sent.message_id))
    assert [r.email for r in reports] == ["r0@example.com", "r1@example.com", "r2@example.com"]
    assert all(re.fullmatch(r"[0-9a-f]{16}", r.token) for r in reports)
    assert len({r.token for r in reports}) == 3
    assert {r.cost for r in reports} == {0.02}


def test_same_seed_replays_the_same_world_and_another_seed_does_not(clock: FakeClock) -> None:
    def settled_reports(seed: int) -> list[RecipientReport]:
        world = World(seed=seed, clock=clock)
        world.send(500)
        return list(world.reports("1000", at=T0 + 600))

    assert settled_reports(1) == settled_reports(1)
    assert settled_reports(1) != settled_reports(2)

    bigger = World(seed=1, clock=clock)
    bigger.send(800)
    assert list(bigger.reports("1000", at=T0 + 600))[:500] == settled_reports(1)


def test_truth_agrees_with_the_reports(world: World, clock: FakeClock) -> None:
    sent = world.send(1500, sent_at=T0 - 300, cost_per_recipient=0.0105)
    reports = list(world.reports(sent.message_id))
    truth = world.truth(sent.message_id)
    assert truth.statuses == tally(iter(reports))
    assert truth.cost == pytest.approx(sum(r.cost for r in reports))
    assert truth.unsubscribed == sum(r.stop_mail for r in reports)
    assert truth.last_date == max(r.date for r in reports)
    assert world.truth(world.send(0).message_id).last_date is None


def test_message_ids_count_up_from_1000(world: World) -> None:
    assert world.send(1).message_id == "1000"
    assert world.send(1, message_id="1001").message_id == "1001"
    assert world.send(1).message_id == "1002"
    with pytest.raises(ValueError, match="already exists"):
        world.send(1, message_id="1000")
    assert [s.message_id for s in world.sends()] == ["1000", "1001", "1002"]
    assert world.get("nope") is None
    with pytest.raises(KeyError):
        next(world.reports("nope"))


# --- bulk-status over HTTP -----------------------------------------------------------------


def test_bulk_status_json_matches_the_upstream_shape(
    world: World, server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    sent = world.send(50, sent_at=T0 - 120)
    response = get(session, server, "bulk-status", apiKey=KEY, messageId=sent.message_id)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.raw.version == 11
    body = response.json()
    assert list(body) == ["success", "code", "messageId", "StatutResponseList"]
    assert body["success"] is True and body["code"] == 200
    assert body["messageId"] == sent.message_id
    first = body["StatutResponseList"][0]
    assert list(first) == ["email", "token", "status", "cost", "stopMail", "date"]
    assert isinstance(first["date"], str) and isinstance(first["stopMail"], bool)
    expected = [
        [r.email, r.token, r.status, r.cost, r.stop_mail, str(r.date)]
        for r in world.reports(sent.message_id)
    ]
    assert [list(item.values()) for item in body["StatutResponseList"]] == expected


def test_bulk_status_xml_has_the_same_reports_in_the_spec_page_form(
    world: World, server: SimulatorServer, session: requests.Session
) -> None:
    sent = world.send(40, sent_at=T0 - 30)
    as_json = get(session, server, "bulk-status", apiKey=KEY, messageId=sent.message_id).json()
    response = get(
        session, server, "bulk-status", apiKey=KEY, messageId=sent.message_id, _format="xml"
    )

    assert response.headers["Content-Type"] == "application/xml; charset=utf-8"
    assert response.text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<result>\n')
    assert "<![CDATA[r0@example.com]]>" in response.text
    root = ET.fromstring(response.content)
    assert root.tag == "result"
    assert {element.tag for element in root.iter()} == {"result", "entry"}
    success, code, message_id, recipients = xml_values(root)
    assert (success, code, message_id) == ("true", "200", sent.message_id)
    expected = [
        [r["email"], r["token"], r["status"], str(r["cost"]), str(r["stopMail"]).lower(), r["date"]]
        for r in as_json["StatutResponseList"]
    ]
    assert recipients == expected


@pytest.mark.parametrize(
    ("params", "code", "message"),
    [
        ({"messageId": "1000"}, 1, "La Clé API est requise"),
        ({"apiKey": "", "messageId": "1000"}, 1, "La Clé API est requise"),
        ({"apiKey": "wrong", "messageId": "1000"}, 10, "Clé API incorrecte"),
        ({"apiKey": "wrong"}, 10, "Clé API incorrecte"),
        ({"apiKey": KEY}, 3, "L\u2019ID du message est requis"),
        ({"apiKey": KEY, "messageId": ""}, 3, "L\u2019ID du message est requis"),
        ({"apiKey": KEY, "messageId": "999"}, 4, "Message introuvable"),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_error_codes(
    world: World,
    server: SimulatorServer,
    session: requests.Session,
    params: dict[str, str],
    code: int,
    message: str,
    fmt: str,
) -> None:
    world.send(10)
    if fmt == "xml":
        params = {**params, "_format": "xml"}
    response = get(session, server, "bulk-status", **params)

    assert response.status_code == 200
    if fmt == "json":
        assert response.json() == {"success": False, "code": code, "message": message}
    else:
        assert response.text.startswith("<?xml version='1.0' encoding='UTF-8'?>\n<result>")
        assert xml_values(ET.fromstring(response.content)) == ["false", str(code), message]
    assert "wrong" not in response.text and KEY not in response.text


def test_me_reports_credits_in_sms_partners_layout(
    world: World, server: SimulatorServer, session: requests.Session
) -> None:
    world.send(1000)
    response = get(session, server, "me", apiKey=KEY)
    assert response.headers["Content-Type"] == "application/json"
    assert response.text == (
        '{"success":true,"code":200,'
        '"user":{"username":"demo","firstname":"Demo","lastname":"Simulator"},'
        '"credits":{"creditMail":99000,"toSend":1000,"solde":"489.500","currency":"EUR",'
        '"balance":"489.500"}}'
    )
    xml = get(session, server, "me", apiKey=KEY, _format="xml")
    assert "<![CDATA[489.500]]>" in xml.text
    assert xml_values(ET.fromstring(xml.content)) == [
        "true",
        "200",
        ["demo", "Demo", "Simulator"],
        ["99000", "1000", "489.500", "EUR", "489.500"],
    ]
    assert get(session, server, "me").json()["code"] == 1
    assert get(session, server, "me", apiKey="wrong").json()["code"] == 10


def test_me_credits_drop_by_exactly_what_a_new_send_uses(
    world: World, server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    world.send(1000, sent_at=T0 - HOURS_48, cost_per_recipient=0.05)
    before = get(session, server, "me", apiKey=KEY).json()["credits"]
    assert before == {
        "creditMail": 99000,
        "toSend": 0,
        "solde": "450.000",
        "currency": "EUR",
        "balance": "450.000",
    }
    base = server.url.removesuffix("/v1")
    assert session.post(f"{base}/sim/send", json={"recipients": 250}).ok

    after = get(session, server, "me", apiKey=KEY).json()["credits"]
    assert after["creditMail"] == 99000 - 250
    assert after["solde"] == after["balance"] == "447.375"  # 250 x 0.0105 = 2.625 less
    assert after["toSend"] == 250, "every new recipient waits for its report"


def test_me_to_send_falls_as_reports_arrive(
    world: World, server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    sent = world.send(2000)
    world.send(300, sent_at=T0 - 600)

    def to_send() -> int:
        credits = get(session, server, "me", apiKey=KEY).json()["credits"]
        assert credits["creditMail"] == 100_000 - 2300, "arrivals never give credits back"
        return int(credits["toSend"])

    seen = [to_send()]
    for step in (5, 60, 3600, HOURS_48):
        clock.advance(step)
        seen.append(to_send())
        assert seen[-1] == world.waiting()
        assert seen[-1] == sum(
            r.status == "Waiting" for s in world.sends() for r in world.reports(s.message_id)
        )
    assert seen[0] > 2000 and seen == sorted(seen, reverse=True) and seen[-1] == 0
    assert len(set(seen)) == len(seen), seen
    assert tally(world.reports(sent.message_id))["Waiting"] == 0


# --- rate limit and faults -----------------------------------------------------------------


@pytest.mark.parametrize(("style", "http_status"), [("http", 429), ("json", 200)])
def test_rate_limit_per_sliding_minute(
    serve: Serve, session: requests.Session, clock: FakeClock, style: str, http_status: int
) -> None:
    server = serve(rate_limit_per_minute=3, faults=Faults(rate_limit_style=style, retry_after=7))
    for _ in range(3):
        assert get(session, server, "me", apiKey=KEY).json()["code"] == 200
    clock.advance(30)
    limited = get(session, server, "me", apiKey=KEY)
    assert limited.status_code == http_status
    assert limited.headers["Retry-After"] == "7"
    assert limited.json() == {"success": False, "code": 429, "message": "Too many requests"}

    clock.advance(30)  # the first three are now a minute old
    assert get(session, server, "me", apiKey=KEY).json()["code"] == 200
    assert server.stats().requests == {"me": 5}


def test_forced_http_status_answers_html(
    server: SimulatorServer, session: requests.Session
) -> None:
    server.faults.http_status = 502
    response = get(session, server, "bulk-status", apiKey=KEY, messageId="1")
    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert "502 Bad Gateway" in response.text


def test_invalid_body_is_truncated_json(
    world: World, server: SimulatorServer, session: requests.Session
) -> None:
    world.send(20)
    server.faults.invalid_body = True
    response = get(session, server, "bulk-status", apiKey=KEY, messageId="1000")
    assert response.status_code == 200
    with pytest.raises(requests.JSONDecodeError):
        response.json()


def test_forced_error_code_and_rejected_key(
    world: World, server: SimulatorServer, session: requests.Session
) -> None:
    world.send(20)
    server.faults.error_code = 4
    assert get(session, server, "bulk-status", apiKey=KEY, messageId="1000").json()["code"] == 4
    server.faults.error_code = None
    server.faults.reject_key = True
    assert get(session, server, "bulk-status", apiKey=KEY, messageId="1000").json()["code"] == 10


def test_latency_lets_requests_overlap(serve: Serve) -> None:
    server = serve(faults=Faults(latency=0.05))
    start = threading.Barrier(4)

    def poll() -> None:
        start.wait()
        requests.get(f"{server.url}/me", params={"apiKey": KEY}, timeout=5)

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.stats().max_in_flight >= 2


def test_gzip_only_when_enabled_and_accepted(
    world: World, server: SimulatorServer, session: requests.Session
) -> None:
    world.send(100)
    plain = get(session, server, "bulk-status", apiKey=KEY, messageId="1000")
    assert "Content-Encoding" not in plain.headers
    server.faults.gzip = True
    zipped = get(session, server, "bulk-status", apiKey=KEY, messageId="1000")
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert int(zipped.headers["Content-Length"]) < len(plain.content)
    assert zipped.json() == plain.json()
    identity = session.get(
        f"{server.url}/me", params={"apiKey": KEY}, headers={"Accept-Encoding": "identity"}
    )
    assert "Content-Encoding" not in identity.headers


# --- control endpoints and stats -----------------------------------------------------------


def test_control_endpoints(server: SimulatorServer, session: requests.Session) -> None:
    base = server.url.removesuffix("/v1")
    faults = session.post(f"{base}/sim/faults", json={"error_code": 10, "latency": 0}).json()
    assert faults["error_code"] == 10 and faults["latency"] == 0.0
    assert server.faults.error_code == 10
    assert session.post(f"{base}/sim/faults", json={"error_code": None}).ok
    for bad in ({"nope": 1}, {"gzip": "yes"}, {"latency": True}, {"rate_limit_style": "x"}):
        assert session.post(f"{base}/sim/faults", json=bad).status_code == 400
    assert server.faults == Faults()

    sent = session.post(f"{base}/sim/send", json={"recipients": 25, "campaign": "promo"}).json()
    assert get(session, server, "bulk-status", apiKey=KEY, messageId=sent["messageId"]).ok
    assert server.world.get(sent["messageId"]) == SimulatedSend(
        sent["messageId"], T0, 25, 0.0105, "promo"
    )
    assert session.post(f"{base}/sim/send", json={"campaign": "x"}).status_code == 400
    assert session.get(f"{base}/nowhere").status_code == 404
    assert session.get(f"{server.url}/send").status_code == 404


def test_stats_count_every_v1_request(
    world: World, server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    world.send(5)
    get(session, server, "bulk-status", apiKey=KEY, messageId="1000")
    clock.advance(15)
    get(session, server, "bulk-status", apiKey="wrong", messageId="1000")
    get(session, server, "bulk-status", apiKey=KEY, messageId="404")
    get(session, server, "me", apiKey=KEY)

    stats = server.stats()
    assert stats.requests == {"bulk-status": 3, "me": 1}
    assert stats.polls == {"1000": 2, "404": 1}
    assert stats.request_times == (T0, T0 + 15, T0 + 15, T0 + 15)
    assert stats.max_in_flight == 1
    remote = session.get(server.url.removesuffix("/v1") + "/sim/stats").json()
    assert remote["requests"] == {"bulk-status": 3, "me": 1}
    assert remote["request_times"] == list(stats.request_times)


# --- sending rules: commercial sends held through quiet hours, deferred and cancelled sends --


def paris(year: int, month: int, day: int, hour: int, minute: int) -> float:
    """Epoch seconds of a Europe/Paris wall-clock time."""
    return dt.datetime(year, month, day, hour, minute, tzinfo=PARIS).timestamp()


FRIDAY_EVENING = paris(2026, 11, 27, 21, 0)
MONDAY_OPENING = paris(2026, 11, 30, 8, 0)


def statuses(world: World, message_id: str, at: float) -> Counter[str]:
    return tally(world.reports(message_id, at=at))


def test_a_commercial_send_on_friday_evening_waits_until_monday_0800() -> None:
    clock = FakeClock(FRIDAY_EVENING)
    world = World(seed=7, clock=clock)
    sent = world.send(500, commercial=True, campaign="newsletter")
    assert sent.commercial and sent.goes_out == MONDAY_OPENING

    for at in (FRIDAY_EVENING + 3600, paris(2026, 11, 29, 12, 0), MONDAY_OPENING - 1):
        reports = list(world.reports(sent.message_id, at=at))
        assert {(r.status, r.date) for r in reports} == {("Waiting", int(FRIDAY_EVENING))}
        assert world.waiting(at=at) == 500
        assert world.truth(sent.message_id, at=at).statuses == {"Waiting": 500}

    # From the opening on, exactly what a send made on Monday at 08:00 shows.
    made_on_monday = World(seed=7, clock=clock)
    made_on_monday.send(500, sent_at=MONDAY_OPENING, campaign="newsletter")
    for after in (0, 60, 3600, HOURS_48):
        at = MONDAY_OPENING + after
        reports = list(world.reports(sent.message_id, at=at))
        assert reports == list(made_on_monday.reports(sent.message_id, at=at))
        assert min(r.date for r in reports) >= MONDAY_OPENING, "no report before the release"
        assert world.truth(sent.message_id, at=at).last_date == max(r.date for r in reports)
    assert statuses(world, sent.message_id, MONDAY_OPENING + 60)["Delivered"] > 300
    assert "Waiting" not in statuses(world, sent.message_id, MONDAY_OPENING + HOURS_48)


def test_a_commercial_send_on_the_eve_of_ascension_waits_until_the_friday() -> None:
    wednesday_evening = paris(2027, 5, 5, 21, 0)  # Ascension Day is Thursday 6 May 2027
    world = World(seed=7, clock=FakeClock(wednesday_evening))
    sent = world.send(100, commercial=True)
    assert sent.goes_out == paris(2027, 5, 7, 8, 0)
    assert statuses(world, sent.message_id, paris(2027, 5, 6, 12, 0)) == {"Waiting": 100}
    assert statuses(world, sent.message_id, paris(2027, 5, 7, 8, 10))["Delivered"] > 60


def test_transactional_sends_at_night_and_a_lifted_account_are_not_held() -> None:
    saturday_night = paris(2026, 11, 28, 3, 0)
    held = World(seed=7, clock=FakeClock(saturday_night))
    transactional = held.send(200)
    assert not transactional.commercial and transactional.goes_out == saturday_night
    assert statuses(held, transactional.message_id, saturday_night + 60)["Delivered"] > 120

    lifted = World(seed=7, clock=FakeClock(saturday_night), holds_commercial=False)
    commercial = lifted.send(200, commercial=True)
    assert not commercial.commercial and commercial.goes_out == saturday_night
    assert list(lifted.reports("1000", at=saturday_night + 60)) == list(
        held.reports("1000", at=saturday_night + 60)
    )


def test_a_commercial_send_in_working_hours_goes_out_at_once(world: World) -> None:
    sent = world.send(10, commercial=True)  # Thursday 11:00 in Paris
    assert sent.goes_out == T0
    plain = World(seed=7, clock=world.clock)
    plain.send(10)
    assert list(world.reports("1000", at=T0 + 30)) == list(plain.reports("1000", at=T0 + 30))


def test_a_deferred_send_has_only_waiting_recipients_until_its_time(
    world: World, server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    scheduled = T0 + 3600
    sent = world.send(300, scheduled_at=scheduled)
    assert (sent.sent_at, sent.scheduled_at, sent.goes_out) == (T0, scheduled, scheduled)

    def poll() -> list[dict[str, Any]]:
        body = get(session, server, "bulk-status", apiKey=KEY, messageId=sent.message_id).json()
        assert body["code"] == 200, "accepted: the message exists from the start"
        return list(body["StatutResponseList"])

    for step in (0, 1800, 1799):
        clock.advance(step)
        assert {(r["status"], r["date"]) for r in poll()} == {("Waiting", str(int(T0)))}
    assert world.waiting() == 300
    clock.advance(1 + 600)
    reports = poll()
    assert Counter(r["status"] for r in reports)["Delivered"] > 200
    assert min(int(r["date"]) for r in reports) >= scheduled


def test_a_commercial_deferred_send_in_quiet_hours_goes_out_at_the_next_opening(
    world: World,
) -> None:
    sent = world.send(10, commercial=True, scheduled_at=paris(2026, 11, 26, 22, 0))
    assert sent.goes_out == paris(2026, 11, 27, 8, 0)
    transactional = world.send(10, scheduled_at=paris(2026, 11, 26, 22, 0))
    assert transactional.goes_out == paris(2026, 11, 26, 22, 0)


@pytest.mark.parametrize(
    ("scheduled_at", "error"),
    [
        (T0 + 60, "5-minute step"),
        (T0 + 300.5, "5-minute step"),
        (float("inf"), "5-minute step"),
        (T0 - 300, "before the send"),
    ],
)
def test_a_deferred_send_needs_a_future_5_minute_step(
    world: World, scheduled_at: float, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        world.send(1, scheduled_at=scheduled_at)
    assert world.sends() == []


def cancel(
    session: requests.Session, server: SimulatorServer, message_id: str, **params: str
) -> requests.Response:
    return get(session, server, "message-cancel", apiKey=KEY, messageId=message_id, **params)


def test_cancelling_a_deferred_send_10_minutes_before_makes_it_unknown(
    world: World, server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    sent = world.send(300, scheduled_at=T0 + 3600)
    clock.advance(3600 - 600)
    response = cancel(session, server, sent.message_id)
    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "code": 200,
        "message": "L\u2019envoi a été annulé",
    }
    for later in (0, 600, HOURS_48):
        clock.advance(later)
        status = get(session, server, "bulk-status", apiKey=KEY, messageId=sent.message_id)
        assert status.json() == {"success": False, "code": 4, "message": "Message introuvable"}
    assert world.get(sent.message_id) is None and world.sends() == []
    credits = get(session, server, "me", apiKey=KEY).json()["credits"]
    assert (credits["creditMail"], credits["toSend"]) == (100_000, 0), "nothing was used"
    again = cancel(session, server, sent.message_id).json()
    assert again == {"success": False, "code": 5, "message": "L\u2019envoi a déjà été annulé"}
    assert world.send(1).message_id == "1001", "a cancelled send keeps its ID"
    assert server.stats().requests["message-cancel"] == 2


def test_a_deferred_send_cannot_be_cancelled_within_5_minutes_of_going_out(
    world: World, server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    sent = world.send(30, scheduled_at=T0 + 3600)
    clock.advance(3600 - 120)
    refused = cancel(session, server, sent.message_id).json()
    assert refused == {
        "success": False,
        "code": 6,
        "message": "Impossible d\u2019annuler un envoi moins de 5 minutes avant son départ",
    }
    clock.advance(120 + 60)
    status = get(session, server, "bulk-status", apiKey=KEY, messageId=sent.message_id).json()
    assert status["code"] == 200 and len(status["StatutResponseList"]) == 30
    assert cancel(session, server, sent.message_id).json()["code"] == 7, "gone out by now"


def test_world_cancel_allows_up_to_exactly_5_minutes_before(world: World, clock: FakeClock) -> None:
    held = world.send(10, commercial=True, scheduled_at=paris(2026, 11, 28, 10, 0))  # Saturday
    monday = paris(2026, 11, 30, 8, 0)
    with pytest.raises(TooLateToCancel):
        world.cancel(held.message_id, at=monday - 299)  # 5 minutes before it goes out, Monday
    assert world.cancel(held.message_id, at=monday - 300) == held
    with pytest.raises(AlreadyCancelled):
        world.cancel(held.message_id)
    with pytest.raises(NotCancellable):
        world.cancel(world.send(10).message_id)
    with pytest.raises(KeyError):
        world.cancel("424242")


@pytest.mark.parametrize(
    ("params", "code", "message"),
    [
        ({"apiKey": KEY, "messageId": "424242"}, 4, "Message introuvable"),
        ({"apiKey": KEY, "messageId": "1000"}, 7, "Impossible d\u2019annuler un envoi déjà parti"),
        ({"apiKey": KEY}, 3, "L\u2019ID du message est requis"),
        ({"messageId": "1000"}, 1, "La Clé API est requise"),
        ({"apiKey": "wrong", "messageId": "1000"}, 10, "Clé API incorrecte"),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_message_cancel_errors(
    world: World,
    server: SimulatorServer,
    session: requests.Session,
    params: dict[str, str],
    code: int,
    message: str,
    fmt: str,
) -> None:
    world.send(10)  # 1000: not deferred
    if fmt == "xml":
        params = {**params, "_format": "xml"}
    response = get(session, server, "message-cancel", **params)
    assert response.status_code == 200
    if fmt == "json":
        assert response.json() == {"success": False, "code": code, "message": message}
    else:
        assert xml_values(ET.fromstring(response.content)) == ["false", str(code), message]
    assert world.get("1000") is not None


def test_message_cancel_and_bulk_status_in_xml(
    world: World, server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    clock.now = FRIDAY_EVENING
    held = world.send(3, commercial=True)
    deferred = world.send(2, scheduled_at=FRIDAY_EVENING + 3600)
    xml = get(session, server, "bulk-status", apiKey=KEY, messageId=held.message_id, _format="xml")
    _, _, _, recipients = xml_values(ET.fromstring(xml.content))
    assert [(r[2], r[5]) for r in recipients] == [("Waiting", str(int(FRIDAY_EVENING)))] * 3

    response = cancel(session, server, deferred.message_id, _format="xml")
    assert response.headers["Content-Type"] == "application/xml; charset=utf-8"
    assert xml_values(ET.fromstring(response.content)) == [
        "true",
        "200",
        "L\u2019envoi a été annulé",
    ]
    gone = get(
        session, server, "bulk-status", apiKey=KEY, messageId=deferred.message_id, _format="xml"
    )
    assert xml_values(ET.fromstring(gone.content)) == ["false", "4", "Message introuvable"]


def test_sim_send_makes_commercial_and_deferred_sends(
    world: World, server: SimulatorServer, session: requests.Session
) -> None:
    base = server.url.removesuffix("/v1")
    body = {"recipients": 5, "commercial": True, "scheduled_at": paris(2026, 11, 28, 9, 0)}
    sent = session.post(f"{base}/sim/send", json=body).json()
    made = world.get(sent["messageId"])
    assert made is not None and made.commercial
    assert made.goes_out == paris(2026, 11, 30, 8, 0)
    for bad in ({"commercial": 1}, {"scheduled_at": T0 + 1}, {"scheduled_at": "soon"}):
        answer = session.post(f"{base}/sim/send", json={"recipients": 5, **bad})
        assert answer.status_code == 400, bad
    assert len(world.sends()) == 1


# --- demo campaign and command line --------------------------------------------------------


BUILT_IN = {
    "1000": "welcome",
    "1001": "password-reset",
    "1002": "newsletter",
    "1003": "promo",
    "1004": "invoice",
    "1005": "reactivation",
}  # deploy/docker/config.yaml lists these IDs with these campaigns


def is_stream(send: SimulatedSend) -> bool:
    return send.recipients == 1 and send.campaign in TRANSACTIONAL


def test_demo_campaign(world: World, clock: FakeClock) -> None:
    demo = DemoCampaign(world, interval=180)
    started = demo.start()
    assert [s.message_id for s in started] == [str(i) for i in range(1000, 1000 + len(started))]
    assert {s.message_id: s.campaign for s in started[:6]} == BUILT_IN
    # Sends of every age, from the stream's of the last minute to a campaign of 47 hours.
    ages = sorted(T0 - s.sent_at for s in started)
    assert ages[0] == 0 and ages[-1] < HOURS_48
    bounds = (0, 60, 600, 3600, 4 * 3600, 24 * 3600, HOURS_48)
    assert all(any(a < age < b for age in ages) for a, b in itertools.pairwise(bounds))
    campaigns = [s for s in started if not is_stream(s)]
    assert max(s.recipients for s in started) == MAX_RECIPIENTS
    by_label: Counter[str] = Counter()
    for send in campaigns:
        by_label[send.campaign] += send.recipients
    assert max(by_label.values()) > MAX_RECIPIENTS, "a big campaign is several sends"
    history = [s for s in started[6:] if is_stream(s)]
    assert sorted(T0 - s.sent_at for s in history) == [5.0 * k for k in range(12)]
    assert {s.campaign for s in history} == set(TRANSACTIONAL)

    assert demo.due() == []
    clock.advance(400)
    new = demo.due()
    assert [s.sent_at for s in new] == sorted(s.sent_at for s in new), "in time order"
    assert {s.sent_at for s in new if not is_stream(s)} == {T0 + 180, T0 + 360}
    assert [s.sent_at for s in new if is_stream(s)] == [T0 + 5 * k for k in range(1, 81)]
    assert all(1 <= s.recipients <= MAX_RECIPIENTS for s in new)
    assert demo.due() == []

    replay = World(seed=7, clock=FakeClock(T0))
    again = DemoCampaign(replay, interval=180)
    assert again.start() == started
    replay.clock = clock
    assert again.due() == new


def test_demo_campaigns_are_sends_of_at_most_500_with_one_label(
    world: World, clock: FakeClock
) -> None:
    demo = DemoCampaign(world, interval=180, transactional_interval=0)
    demo.start()
    clock.advance(180 * 200)
    by_slot: dict[float, list[SimulatedSend]] = {}
    for send in demo.due():
        by_slot.setdefault(send.sent_at, []).append(send)
    assert sorted(by_slot) == [T0 + 180 * k for k in range(1, 201)]
    for sends in by_slot.values():
        assert len({s.campaign for s in sends}) == 1
        assert set(TRANSACTIONAL).isdisjoint({s.campaign for s in sends})
        *full, last = [s.recipients for s in sends]
        assert full == [MAX_RECIPIENTS] * len(full) and 0 < last <= MAX_RECIPIENTS
        assert 50 <= sum(s.recipients for s in sends) <= 2000
    assert max(len(sends) for sends in by_slot.values()) > 1
    assert all(s.recipients <= MAX_RECIPIENTS for s in world.sends())


def test_the_transactional_stream_is_one_recipient_sends_every_interval() -> None:
    def stream(seed: int, step: float) -> list[SimulatedSend]:
        """Two minutes of a 2-second stream, asking for the sends every ``step`` seconds."""
        clock = FakeClock(T0)
        demo = DemoCampaign(World(seed=seed, clock=clock), interval=3600, transactional_interval=2)
        demo.start()
        sends: list[SimulatedSend] = []
        while clock.now < T0 + 120:
            clock.advance(step)
            sends += demo.due()
        return sends

    sends = stream(7, 120)
    assert [s.sent_at for s in sends] == [T0 + 2 * k for k in range(1, 61)]
    assert all(is_stream(s) for s in sends)
    counts = Counter(s.campaign for s in sends)
    assert set(counts) == set(TRANSACTIONAL) and min(counts.values()) > 10
    # Whenever due() is called, the same sends with the same IDs: dated by slot, not by call.
    assert stream(7, 3) == sends
    assert [s.campaign for s in stream(8, 120)] != [s.campaign for s in sends]


@pytest.mark.parametrize("off", [0, None])
def test_transactional_interval_zero_turns_the_stream_off(
    world: World, clock: FakeClock, off: float | None
) -> None:
    demo = DemoCampaign(world, interval=180, transactional_interval=off)
    started = demo.start()
    assert {s.message_id: s.campaign for s in started[:6]} == BUILT_IN
    clock.advance(400)
    new = demo.due()
    assert [s.sent_at for s in new] == sorted(s.sent_at for s in new)
    assert {s.sent_at for s in new} == {T0 + 180, T0 + 360}
    assert not any(is_stream(s) for s in started[6:] + new)

    # The campaigns do not depend on the stream: they draw from their own generator.
    with_stream = World(seed=7, clock=FakeClock(T0))
    demo = DemoCampaign(with_stream, interval=180)
    demo.start()
    with_stream.clock = clock
    campaigns = [s for s in demo.due() if not is_stream(s)]
    assert [(s.sent_at, s.recipients, s.campaign) for s in campaigns] == [
        (s.sent_at, s.recipients, s.campaign) for s in new
    ]
    with pytest.raises(ValueError, match="transactional_interval"):
        DemoCampaign(world, transactional_interval=-1)


def test_the_demo_forgets_its_sends_49_hours_after_they_go_out(
    world: World, clock: FakeClock
) -> None:
    demo = DemoCampaign(world, interval=600, transactional_interval=60)
    started = demo.start()
    sizes: list[int] = []
    made = list(started)
    for _ in range(5 * 24):  # Thursday 11:00 to Tuesday 11:00, over a weekend
        clock.advance(3600)
        new = demo.due()
        assert new and all(world.get(s.message_id) == s for s in new)
        made += new
        sizes.append(len(world.sends()))
    kept = {s.message_id for s in world.sends()}
    assert kept == set(BUILT_IN) | {s.message_id for s in made if s.goes_out >= clock() - KEEP}
    # Friday night's campaigns went out on Monday morning: kept although made 3 days ago.
    assert any(world.get(s.message_id) for s in made if s.sent_at < clock() - 3 * 24 * 3600)
    # 49 hours of sends (60 an hour from the stream, at most 6 x 4 from the campaigns), the
    # weekend's held campaigns (60 hours of them), and the built-in ones, which are never
    # forgotten: bounded after two days as after five.
    assert max(sizes[49:]) <= 49 * (60 + 6 * 4) + 60 * 6 * 4 + 6 < 0.7 * len(made)
    assert [s.message_id for s in started if world.get(s.message_id)] == list(BUILT_IN)
    forgotten = started[-1].message_id
    assert world.get(forgotten) is None
    with pytest.raises(KeyError):
        world.truth(forgotten)


def test_the_exporters_demo_hands_over_each_send_once(clock: FakeClock) -> None:
    demo = Demo(seed=3, clock=clock)
    demo.start()
    try:
        config = demo.apply(Config(file="demo.yaml"))
        started = {spec.id for spec in config.messages}
        assert len(started) == 6 + 4 + 3 + 12  # built-in, bigger campaigns' others, 3, stream
        assert demo.new_messages() == []
        clock.advance(60)
        assert [spec.sent_at for spec in demo.new_messages()] == [T0 + 5 * k for k in range(1, 13)]
        labels: set[str] = set()
        for _ in range(60):
            clock.advance(3600)
            new = demo.new_messages()
            assert len(new) >= 720 and started.isdisjoint(spec.id for spec in new)
            labels |= {spec.labels["campaign"] for spec in new}
        assert set(TRANSACTIONAL) < labels
        # A reload: only the later sends the simulator still has, 49 hours' rather than 61.
        config = demo.apply(Config(file="demo.yaml"))
        later = [spec for spec in config.messages if spec.id not in started]

        def goes_out(spec: MessageSpec) -> float:
            start = spec.scheduled_at or spec.sent_at or 0.0
            return start if spec.transactional else calendar.release(start)

        assert min(map(goes_out, later)) >= clock() - KEEP  # kept 49 h from going out
        assert len(later) <= 49 * (720 + 20 * 4)
    finally:
        demo.stop()


def test_the_demo_shows_a_send_made_after_hours_and_a_deferred_one(
    world: World, clock: FakeClock
) -> None:
    started = DemoCampaign(world).start()
    by_campaign = {s.campaign: s for s in started}
    after_hours, deferred = by_campaign["after-hours-promo"], by_campaign["deferred-promo"]
    assert [after_hours.message_id, deferred.message_id] == ["1010", "1011"]
    # Started on Thursday at 11:00: made on Wednesday at 21:30, released at 08:00.
    assert after_hours.sent_at == paris(2026, 11, 25, 21, 30)
    assert after_hours.commercial and after_hours.goes_out == paris(2026, 11, 26, 8, 0)
    assert statuses(world, "1010", T0)["Delivered"] > 300
    assert (deferred.sent_at, deferred.scheduled_at) == (T0, T0 + 900)
    assert deferred.commercial and deferred.goes_out == T0 + 900
    assert statuses(world, "1011", T0 + 899) == {"Waiting": 250}
    # Deferred into the coming night, it will be held when it goes out: a held send to show
    # whatever the hour the demo starts.
    overnight = by_campaign["overnight-promo"]
    assert overnight.message_id == "1012"
    assert overnight.scheduled_at == paris(2026, 11, 26, 20, 30)
    assert overnight.goes_out == paris(2026, 11, 27, 8, 0)
    # Campaigns are commercial, the transactional stream is not.
    assert all(s.commercial != (s.campaign in TRANSACTIONAL) for s in started)

    clock.advance(1)  # the next 5-minute step at least 15 minutes on: 15:05 later
    assert DemoCampaign(World(seed=7, clock=clock)).start()[11].scheduled_at == T0 + 1200


def test_a_demo_started_in_quiet_hours_holds_its_campaigns() -> None:
    saturday = paris(2026, 11, 28, 15, 0)
    clock = FakeClock(saturday)
    world = World(seed=7, clock=clock)
    demo = DemoCampaign(world, interval=180)
    started = demo.start()
    after_hours = next(s for s in started if s.campaign == "after-hours-promo")
    assert after_hours.sent_at == saturday - 1800 and after_hours.goes_out == MONDAY_OPENING
    deferred = next(s for s in started if s.campaign == "deferred-promo")
    assert deferred.scheduled_at == saturday + 900 and deferred.goes_out == MONDAY_OPENING
    held_at_start = {s.campaign for s in started[:6] if s.goes_out > saturday}
    assert held_at_start == {"welcome", "newsletter", "promo"}  # made today; reactivation Thu

    clock.advance(400)
    new = demo.due()
    held = {s.goes_out for s in new if not is_stream(s)}
    assert held == {MONDAY_OPENING}, "Saturday's campaigns go out on Monday"
    stream = [s for s in new if is_stream(s)]
    assert stream and all(s.goes_out == s.sent_at for s in stream)
    assert world.truth(stream[0].message_id).statuses != {"Waiting": 1}

    lifted = World(seed=7, clock=FakeClock(saturday), holds_commercial=False)
    assert all(s.goes_out <= s.sent_at + 900 for s in DemoCampaign(lifted).start())


@pytest.mark.parametrize(
    ("now", "made"),
    [
        (paris(2026, 11, 26, 11, 0), paris(2026, 11, 25, 21, 30)),  # Thursday: Wednesday night
        (paris(2026, 11, 26, 21, 0), paris(2026, 11, 26, 20, 30)),  # held since 20:00
        (paris(2026, 11, 26, 20, 10), paris(2026, 11, 26, 20, 9)),  # quiet for 10 minutes
        (paris(2026, 11, 27, 3, 0), paris(2026, 11, 27, 2, 30)),
        (paris(2026, 11, 27, 8, 10), paris(2026, 11, 26, 21, 30)),  # released at 08:00
        (paris(2026, 11, 30, 10, 0), paris(2026, 11, 29, 21, 30)),  # Monday: Sunday night
    ],
)
def test_the_after_hours_campaign_is_made_in_the_latest_quiet_period(
    now: float, made: float
) -> None:
    assert quiet_time_before(now) == made


def test_simulator_flags() -> None:
    args = parse_args([])
    assert (args.demo_sends, args.send_interval, args.transactional_interval) == (
        False,
        180.0,
        5.0,
    )
    args = parse_args(["--demo-sends", "--transactional-interval", "2.5"])
    assert (args.demo_sends, args.transactional_interval) == (True, 2.5)
    assert parse_args(["--transactional-interval", "0"]).transactional_interval == 0.0
    assert not parse_args([]).all_transactional
    assert parse_args(["--all-transactional"]).all_transactional


def test_the_simulator_prints_when_a_held_or_deferred_send_goes_out(world: World) -> None:
    friday = paris(2026, 11, 27, 21, 0)
    held = world.send(500, sent_at=friday, commercial=True, campaign="promo")
    assert describe(held, friday) == "message ID 1000 (promo, 500 recipients, held until Mon 08:00)"
    deferred = world.send(1, scheduled_at=T0 + 600, campaign="invoice")
    assert describe(deferred, T0) == "message ID 1001 (invoice, 1 recipient, deferred until 11:10)"
    assert describe(deferred, T0 + 600) == "message ID 1001 (invoice, 1 recipient)"


@pytest.mark.parametrize(
    "argv",
    [
        ["--transactional-interval", "-1"],
        ["--transactional-interval", "soon"],
        ["--transactional-interval", "nan"],
        ["--send-interval", "0"],
    ],
)
def test_simulator_flags_refuse_bad_intervals(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_simulator_help_documents_the_stream(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--transactional-interval" in text
    assert "0 turns them off" in text


@pytest.mark.e2e
def test_cli_serves_until_sigterm() -> None:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "exporter.simulator", "--listen", "127.0.0.1:0"),
            *("--demo-sends", "--transactional-interval", "0.5"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1); message IDs: 1000 1001 .* 1005", line)
        assert match, line
        assert len(line.split()) > 120, "the stream's last minute: a send every 0.5 s"
        me = requests.get(f"{match[1]}/me", params={"apiKey": "demo-key"}, timeout=5)
        assert me.json()["code"] == 200
        process.stdout.readline()  # where SMS Partner is served
        new = process.stdout.readline()  # within a second: the loop runs every second
        assert re.fullmatch(
            r"new send: message ID \d+ \((password-reset|invoice), 1 recipient\)\n", new
        )
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=5)
    assert process.returncode == 0
    assert "demo-key" not in line and stderr == ""


def test_error_bodies_never_echo_the_key(
    server: SimulatorServer, session: requests.Session
) -> None:
    for path in ("bulk-status", "me"):
        response = get(session, server, path, apiKey="leak-me-please")
        assert "leak-me-please" not in response.text
