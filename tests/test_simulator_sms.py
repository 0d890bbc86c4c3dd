"""The simulator's SMS Partner flavour under ``/smspartner/v1``, over real loopback sockets."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from exporter.simulator import Faults, SimulatedSend, SimulatorServer, World
from tests.conftest import START, TEST_KEY, FakeClock
from tests.test_simulator import xml_values

Serve = Callable[..., SimulatorServer]

KEY = TEST_KEY
SMS_KEY = "test-sms-key-4d2b7e91"
T0 = START
HOURS_48 = 48 * 3600
SMS_STATUSES = {"waiting", "delivered", "not delivered", "ko"}


@pytest.fixture
def world(clock: FakeClock) -> World:
    return World(seed=7, clock=clock)


@pytest.fixture
def serve(world: World) -> Iterator[Serve]:
    servers: list[SimulatorServer] = []

    def start(**options: Any) -> SimulatorServer:
        options = {"api_key": KEY, "sms_api_key": SMS_KEY, **options}
        server = SimulatorServer(options.pop("world", world), **options).start()
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


def sms(
    http: requests.Session, server: SimulatorServer, path: str, **params: str
) -> requests.Response:
    return http.get(f"{server.sms_url}/{path}", params=params, timeout=5)


def mail(
    http: requests.Session, server: SimulatorServer, path: str, **params: str
) -> requests.Response:
    return http.get(f"{server.url}/{path}", params=params, timeout=5)


def control(server: SimulatorServer) -> str:
    return server.url.removesuffix("/v1")


def statuses(http: requests.Session, server: SimulatorServer, message_id: str) -> Counter[str]:
    body = sms(http, server, "bulk-status", apiKey=SMS_KEY, messageId=message_id).json()
    return Counter(item["status"] for item in body["StatutResponse_List"])


# --- bulk-status ---------------------------------------------------------------------------


def test_sms_url_sits_beside_the_mail_url(server: SimulatorServer) -> None:
    port = server.url.removeprefix("http://127.0.0.1:").removesuffix("/v1")
    assert server.url == f"http://127.0.0.1:{port}/v1"
    assert server.sms_url == f"http://127.0.0.1:{port}/smspartner/v1"


def test_bulk_status_json_matches_sms_partners_shape(
    server: SimulatorServer, session: requests.Session
) -> None:
    sent = server.sms_world.send(60, sent_at=T0 - 120)
    response = sms(session, server, "bulk-status", apiKey=SMS_KEY, messageId=sent.message_id)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert list(body) == ["success", "code", "message_id", "StatutResponse_List"]
    assert body["success"] is True and body["code"] == 200
    assert body["message_id"] == sent.message_id
    reports = body["StatutResponse_List"]
    assert len(reports) == 60
    assert reports[0] == {
        "phoneNumber": "+33600000000",
        "status": reports[0]["status"],
        "cost": 0.045,
        "stopSMS": reports[0]["stopSMS"],
        "date": reports[0]["date"],
    }
    assert list(reports[0]) == ["phoneNumber", "status", "cost", "stopSMS", "date"]
    assert [r["phoneNumber"] for r in reports] == [f"+336{i:08d}" for i in range(60)]
    assert all(isinstance(r["date"], str) and isinstance(r["stopSMS"], bool) for r in reports)
    assert {r["status"] for r in reports} <= SMS_STATUSES
    in_sms_words = {
        "Waiting": "waiting",
        "Delivered": "delivered",
        "Not delivered": "not delivered",
    }
    expected = [
        (in_sms_words.get(r.status, "ko"), r.stop_mail, str(r.date))
        for r in server.sms_world.reports(sent.message_id)
    ]
    assert [(r["status"], r["stopSMS"], r["date"]) for r in reports] == expected


def test_bulk_status_xml_has_the_same_reports(
    server: SimulatorServer, session: requests.Session
) -> None:
    sent = server.sms_world.send(30, sent_at=T0 - 30)
    params = {"apiKey": SMS_KEY, "messageId": sent.message_id}
    as_json = sms(session, server, "bulk-status", **params).json()
    response = sms(session, server, "bulk-status", **params, _format="xml")

    assert response.headers["Content-Type"] == "application/xml; charset=utf-8"
    assert response.text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<result>\n')
    assert "<![CDATA[+33600000000]]>" in response.text
    root = ET.fromstring(response.content)
    assert {element.tag for element in root.iter()} == {"result", "entry"}
    success, code, message_id, recipients = xml_values(root)
    assert (success, code, message_id) == ("true", "200", sent.message_id)
    assert recipients == [
        [r["phoneNumber"], r["status"], str(r["cost"]), str(r["stopSMS"]).lower(), r["date"]]
        for r in as_json["StatutResponse_List"]
    ]


def test_statuses_start_waiting_then_settle_in_lower_case(
    server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    sent = server.sms_world.send(2000)
    dates = {
        r["date"]
        for r in sms(
            session, server, "bulk-status", apiKey=SMS_KEY, messageId=sent.message_id
        ).json()["StatutResponse_List"]
    }
    assert dates == {str(int(T0))}
    assert statuses(session, server, sent.message_id) == {"waiting": 2000}

    clock.advance(60)
    after_a_minute = statuses(session, server, sent.message_id)
    assert 0 < after_a_minute["waiting"] < 0.3 * 2000
    assert after_a_minute["delivered"] > 0.6 * 2000

    clock.advance(HOURS_48)
    settled = statuses(session, server, sent.message_id)
    assert set(settled) == {"delivered", "not delivered", "ko"}
    assert 0.9 * 2000 < settled["delivered"] < 0.96 * 2000
    assert 0.03 * 2000 < settled["not delivered"] < 0.09 * 2000
    assert 0 < settled["ko"] < 0.03 * 2000


def test_same_seed_replays_the_same_sms_world_and_another_does_not(
    serve: Serve, session: requests.Session, clock: FakeClock
) -> None:
    def reports(seed: int) -> list[dict[str, object]]:
        server = serve(world=World(seed=seed, clock=clock))
        sent = server.sms_world.send(400, sent_at=T0 - 600)
        body = sms(session, server, "bulk-status", apiKey=SMS_KEY, messageId=sent.message_id)
        return list(body.json()["StatutResponse_List"])

    assert reports(3) == reports(3)
    assert reports(3) != reports(4)

    # Seeded apart from the mail world: the same message ID does not replay the mail fates.
    server = serve(world=World(seed=3, clock=clock))
    mail_send = server.world.send(400, sent_at=T0 - 600)
    mail_body = mail(session, server, "bulk-status", apiKey=KEY, messageId=mail_send.message_id)
    mail_dates = [r["date"] for r in mail_body.json()["StatutResponseList"]]
    assert mail_send.message_id == "1000"
    assert [r["date"] for r in reports(3)] != mail_dates


# --- errors, keys, rate limits and faults --------------------------------------------------


@pytest.mark.parametrize(
    ("params", "code", "message"),
    [
        ({"messageId": "1000"}, 1, "La Clé API est requise"),
        ({"apiKey": "", "messageId": "1000"}, 1, "La Clé API est requise"),
        ({"apiKey": "wrong", "messageId": "1000"}, 10, "Clé API incorrecte"),
        ({"apiKey": KEY, "messageId": "1000"}, 10, "Clé API incorrecte"),
        ({"apiKey": SMS_KEY}, 3, "L\u2019ID du message est requis"),
        ({"apiKey": SMS_KEY, "messageId": ""}, 3, "L\u2019ID du message est requis"),
        ({"apiKey": SMS_KEY, "messageId": "999"}, 4, "Message introuvable"),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_error_codes(
    server: SimulatorServer,
    session: requests.Session,
    params: dict[str, str],
    code: int,
    message: str,
    fmt: str,
) -> None:
    server.sms_world.send(10)
    if fmt == "xml":
        params = {**params, "_format": "xml"}
    response = sms(session, server, "bulk-status", **params)

    assert response.status_code == 200
    if fmt == "json":
        assert response.json() == {"success": False, "code": code, "message": message}
    else:
        assert response.text.startswith("<?xml version='1.0' encoding='UTF-8'?>\n<result>")
        assert xml_values(ET.fromstring(response.content)) == ["false", str(code), message]
    assert KEY not in response.text and SMS_KEY not in response.text


def test_each_flavour_takes_only_its_own_key(
    server: SimulatorServer, session: requests.Session
) -> None:
    server.world.send(5)
    server.sms_world.send(5)
    for path, query in (("me", {}), ("bulk-status", {"messageId": "1000"})):
        assert sms(session, server, path, apiKey=KEY, **query).json()["code"] == 10
        assert mail(session, server, path, apiKey=SMS_KEY, **query).json()["code"] == 10
        assert sms(session, server, path, apiKey=SMS_KEY, **query).json()["code"] == 200
        assert mail(session, server, path, apiKey=KEY, **query).json()["code"] == 200
    assert sms(session, server, "me").json()["code"] == 1


def test_default_sms_key(world: World, session: requests.Session) -> None:
    with SimulatorServer(world, api_key=KEY) as server:
        assert sms(session, server, "me", apiKey="demo-sms-key").json()["code"] == 200
        assert mail(session, server, "me", apiKey="demo-sms-key").json()["code"] == 10


def test_each_flavour_has_its_own_rate_limit_and_stats(
    serve: Serve, session: requests.Session, clock: FakeClock
) -> None:
    server = serve(rate_limit_per_minute=2)
    for _ in range(2):
        assert mail(session, server, "me", apiKey=KEY).json()["code"] == 200
    assert mail(session, server, "me", apiKey=KEY).status_code == 429

    for _ in range(2):
        assert sms(session, server, "me", apiKey=SMS_KEY).json()["code"] == 200
    limited = sms(session, server, "me", apiKey=SMS_KEY)
    assert limited.status_code == 429
    assert limited.json() == {"success": False, "code": 429, "message": "Too many requests"}

    clock.advance(60)
    assert sms(session, server, "me", apiKey=SMS_KEY).json()["code"] == 200
    assert server.stats().requests == {"me": 3}
    assert server.sms_stats().requests == {"me": 4}
    assert server.sms_stats().request_times == (T0, T0, T0, T0 + 60)
    stats = session.get(f"{control(server)}/sim/stats", params={"api": "sms"}).json()
    assert stats["requests"] == {"me": 4}
    assert session.get(f"{control(server)}/sim/stats").json()["requests"] == {"me": 3}
    assert session.get(f"{control(server)}/sim/stats", params={"api": "x"}).status_code == 400


def test_sim_faults_apply_to_both_flavours_unless_one_is_named(
    server: SimulatorServer, session: requests.Session
) -> None:
    faults = f"{control(server)}/sim/faults"

    assert session.post(faults, json={"error_code": 4}).json()["error_code"] == 4
    assert mail(session, server, "me", apiKey=KEY).json()["code"] == 4
    assert sms(session, server, "me", apiKey=SMS_KEY).json()["code"] == 4

    answer = session.post(faults, json={"api": "sms", "error_code": None, "gzip": True}).json()
    assert answer == {**vars(Faults()), "gzip": True}
    assert server.sms_faults == Faults(gzip=True)
    assert server.faults == Faults(error_code=4)
    assert mail(session, server, "me", apiKey=KEY).json()["code"] == 4
    me = sms(session, server, "me", apiKey=SMS_KEY)
    assert me.json()["code"] == 200 and me.headers["Content-Encoding"] == "gzip"

    session.post(faults, json={"api": "mail", "error_code": None})
    assert mail(session, server, "me", apiKey=KEY).json()["code"] == 200

    for bad in ({"api": "fax", "latency": 1}, {"api": 1}, {"api": "sms", "nope": 1}):
        assert session.post(faults, json=bad).status_code == 400
    assert server.faults == Faults() and server.sms_faults == Faults(gzip=True)

    server.sms_faults.http_status = 503
    assert sms(session, server, "me", apiKey=SMS_KEY).status_code == 503
    assert mail(session, server, "me", apiKey=KEY).status_code == 200


def test_constructor_faults_start_out_on_both_flavours(
    serve: Serve, session: requests.Session
) -> None:
    server = serve(faults=Faults(reject_key=True))
    assert server.sms_faults == server.faults and server.sms_faults is not server.faults
    assert sms(session, server, "me", apiKey=SMS_KEY).json()["code"] == 10


# --- sends and /me -------------------------------------------------------------------------


def test_sim_send_with_api_sms_creates_an_sms_send(
    server: SimulatorServer, session: requests.Session
) -> None:
    send = f"{control(server)}/sim/send"
    sms_id = session.post(send, json={"recipients": 40, "api": "sms", "campaign": "otp"}).json()
    mail_id = session.post(send, json={"recipients": 20, "api": "mail"}).json()
    assert sms_id == mail_id == {"messageId": "1000"}, "each world counts its own IDs"

    assert server.sms_world.sends() == [SimulatedSend("1000", T0, 40, 0.045, "otp")]
    assert server.world.sends() == [SimulatedSend("1000", T0, 20, 0.0105, "demo")]
    body = sms(session, server, "bulk-status", apiKey=SMS_KEY, messageId="1000").json()
    assert len(body["StatutResponse_List"]) == 40
    assert session.post(send, json={"recipients": 1, "api": "fax"}).status_code == 400
    assert session.post(send, json={"recipients": 1, "api": None}).json() == {"messageId": "1001"}


def test_sms_me_for_a_fresh_world_with_one_send(
    server: SimulatorServer, session: requests.Session
) -> None:
    server.sms_world.send(1000)
    response = sms(session, server, "me", apiKey=SMS_KEY)
    assert response.text == (
        '{"success":true,"code":200,'
        '"user":{"username":"demo","firstname":"Demo","lastname":"Simulator"},'
        '"credits":{"creditSms":9000,"creditSmsECO":15000,"creditHlr":20000,"toSend":1000,'
        '"solde":"405.000","currency":"EUR","balance":"405.000"}}'
    )
    xml = sms(session, server, "me", apiKey=SMS_KEY, _format="xml")
    assert xml_values(ET.fromstring(xml.content)) == [
        "true",
        "200",
        ["demo", "Demo", "Simulator"],
        ["9000", "15000", "20000", "1000", "405.000", "EUR", "405.000"],
    ]
    mail_credits = mail(session, server, "me", apiKey=KEY).json()["credits"]
    assert mail_credits["creditMail"] == 100_000 and mail_credits["solde"] == "500.000"


def test_sms_me_follows_new_sends_and_arriving_reports(
    server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    def credits() -> dict[str, Any]:
        return dict(sms(session, server, "me", apiKey=SMS_KEY).json()["credits"])

    fresh = credits()
    assert (fresh["creditSms"], fresh["toSend"], fresh["solde"]) == (10_000, 0, "450.000")
    session.post(f"{control(server)}/sim/send", json={"recipients": 200, "api": "sms"})
    sent = credits()
    assert sent["creditSms"] == 10_000 - 200
    assert sent["solde"] == sent["balance"] == "441.000"  # 200 x 0.045 = 9 less
    assert sent["toSend"] == 200
    assert (sent["creditSmsECO"], sent["creditHlr"]) == (15_000, 20_000)

    clock.advance(30)
    waiting = statuses(session, server, "1000")["waiting"]
    assert 0 < credits()["toSend"] == waiting < 200
    clock.advance(HOURS_48)
    assert credits() == {**sent, "toSend": 0}


def test_sms_world_can_be_passed_in(world: World, session: requests.Session) -> None:
    mine = World(seed=99, clock=world.clock, cost_per_recipient=0.06)
    mine.send(10, message_id="otp-1")
    with SimulatorServer(world, api_key=KEY, sms_api_key=SMS_KEY, sms_world=mine) as server:
        assert server.sms_world is mine
        body = sms(session, server, "bulk-status", apiKey=SMS_KEY, messageId="otp-1").json()
        assert {r["cost"] for r in body["StatutResponse_List"]} == {0.06}


def test_default_sms_world_follows_the_mail_worlds_clock(
    world: World, server: SimulatorServer
) -> None:
    assert server.sms_world.seed != world.seed
    world.clock = FakeClock(T0 + 3600)
    assert server.sms_world.send(1).sent_at == T0 + 3600


def test_a_deferred_sms_send_is_cancelled_on_its_own_api_and_key(
    server: SimulatorServer, session: requests.Session, clock: FakeClock
) -> None:
    send = f"{control(server)}/sim/send"
    body = {"recipients": 40, "api": "sms", "scheduled_at": T0 + 3600}
    assert session.post(send, json=body).json() == {"messageId": "1000"}
    deferred_mail = server.world.send(10, scheduled_at=T0 + 3600)
    assert statuses(session, server, "1000") == {"waiting": 40}

    assert (
        mail(session, server, "message-cancel", apiKey=SMS_KEY, messageId="1000").json()["code"]
        == 10
    )
    cancelled = sms(session, server, "message-cancel", apiKey=SMS_KEY, messageId="1000").json()
    assert (cancelled["success"], cancelled["code"]) == (True, 200)
    gone = sms(session, server, "bulk-status", apiKey=SMS_KEY, messageId="1000").json()
    assert gone["code"] == 4
    assert server.world.get(deferred_mail.message_id) == deferred_mail, "the mail send stays"
    assert server.sms_stats().requests == {"bulk-status": 2, "message-cancel": 1}


def test_the_sms_world_shares_the_mail_accounts_restriction(clock: FakeClock) -> None:
    saturday = 1795856400.0  # 2026-11-28 10:00 Europe/Paris
    for holds in (True, False):
        world = World(seed=7, clock=clock, holds_commercial=holds)
        with SimulatorServer(world, api_key=KEY, sms_api_key=SMS_KEY) as server:
            assert server.sms_world.holds_commercial is holds
            sent = server.sms_world.send(1, sent_at=saturday, commercial=True)
            assert (sent.goes_out > saturday) is holds


# --- command line --------------------------------------------------------------------------


@pytest.mark.e2e
def test_cli_serves_sms_partner_with_its_own_key() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter.simulator",
            "--listen=127.0.0.1:0",
            f"--sms-api-key={SMS_KEY}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first, second = process.stdout.readline(), process.stdout.readline()
        assert re.search(r"http://127\.0\.0\.1:\d+/v1; message IDs: none yet", first), first
        match = re.search(r"(http://127\.0\.0\.1:\d+/smspartner/v1)", second)
        assert match, second
        me = requests.get(f"{match[1]}/me", params={"apiKey": SMS_KEY}, timeout=5)
        assert me.json()["credits"]["creditSms"] == 10_000
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=5)
    assert process.returncode == 0
    assert SMS_KEY not in first + second and stderr == ""
