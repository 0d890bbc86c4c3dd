"""The simulated Mail Partner API, over real loopback sockets and with an injected clock."""

from __future__ import annotations

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

from exporter.simulator import (
    DemoCampaign,
    Faults,
    RecipientReport,
    SimulatedSend,
    SimulatorServer,
    World,
)
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


# --- demo campaign and command line --------------------------------------------------------


def test_demo_campaign(world: World, clock: FakeClock) -> None:
    demo = DemoCampaign(world, interval=180)
    built_in = demo.start()
    assert len(built_in) == 6
    assert len({s.campaign for s in built_in}) == 6
    ages = sorted(T0 - s.sent_at for s in built_in)
    assert ages[0] < 60 and ages[-1] < HOURS_48
    assert min(s.recipients for s in built_in) >= 100
    assert max(s.recipients for s in built_in) == 5000

    assert demo.due() == []
    clock.advance(400)
    new = demo.due()
    assert [s.sent_at for s in new] == [T0 + 180, T0 + 360]
    assert all(50 <= s.recipients <= 5000 for s in new)
    assert demo.due() == []

    replay = World(seed=7, clock=FakeClock(T0))
    again = DemoCampaign(replay, interval=180)
    again.start()
    replay.clock = clock
    assert again.due() == new


@pytest.mark.e2e
def test_cli_serves_until_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter.simulator", "--listen", "127.0.0.1:0", "--demo-sends"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1); message IDs: 1000 1001 .* 1005", line)
        assert match, line
        me = requests.get(f"{match[1]}/me", params={"apiKey": "demo-key"}, timeout=5)
        assert me.json()["code"] == 200
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
