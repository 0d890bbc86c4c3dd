"""The API key reaches no log line, exception, traceback, page or metric.

The upstream here is hostile: every answer quotes the request URL back, key and
all, in the places an exporter is tempted to repeat (error messages, bodies).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests
from prometheus_client import generate_latest

from exporter.aggregate import ReportAggregator
from exporter.app import Exporter, load_runnable
from exporter.client import PollError
from exporter.domain import MessageSpec, StatusMap
from exporter.landing import render_landing
from exporter.logs import setup_logging
from exporter.secret import Redactor
from tests.conftest import (
    TEST_KEY,
    CraftedServer,
    FakeClock,
    make_client,
    make_config,
)
from tests.scenario import running

Crafted = Callable[[Callable[[str], CraftedServer.Reply]], CraftedServer]


def echo(path: str) -> CraftedServer.Reply:
    """Answer according to the message ID, quoting the full request path back."""
    url = unquote(path)
    kind = url.rsplit("messageId=", 1)[-1].split("&")[0]
    bodies = {
        "wrapped": (401, json.dumps({"success": False, "code": 10, "message": url})),
        "error": (200, json.dumps({"success": False, "code": 4, "message": url})),
        "garbage": (200, f"{url} is not JSON"),
        "html": (500, f"<html><body>Error at {url}</body></html>"),
        "xml": (200, f"<result><entry>false</entry><entry>10</entry><entry>{url}</entry></result>"),
        "truncated": (200, '{"success": true, "StatutResponseList": [{"status": "' + url),
    }
    status, text = bodies[kind]
    data = text.encode()
    return status, {"Content-Length": str(len(data))}, [data]


KINDS = ["wrapped", "error", "garbage", "html", "xml", "truncated"]


def test_the_echoing_server_does_put_the_key_in_its_answers(crafted: Crafted) -> None:
    server = crafted(echo)
    config = make_config(server.url)
    session = make_client(config)._session
    answer = session.get(
        f"{server.url}/bulk-status", params={"apiKey": TEST_KEY, "messageId": "error"}
    )
    assert TEST_KEY in answer.text


@pytest.mark.parametrize("kind", KINDS)
def test_errors_and_their_tracebacks_are_clean(crafted: Crafted, kind: str) -> None:
    server = crafted(echo)
    fmt = "xml" if kind == "xml" else "json"
    client = make_client(make_config(server.url, format=fmt))
    with pytest.raises(PollError) as caught:
        client.bulk_status(kind, ReportAggregator(StatusMap.default()))
    error = caught.value
    text = "".join(traceback.format_exception(error))
    assert TEST_KEY not in text and TEST_KEY not in repr(error)
    assert error.__cause__ is None and error.__suppress_context__


def test_logs_pages_and_metrics_are_clean(crafted: Crafted) -> None:
    server = crafted(echo)
    clock = FakeClock()
    config = make_config(server.url, *(MessageSpec(kind) for kind in KINDS))
    with running(config, clock) as exporter:
        book, poller, registry = exporter.book, exporter.poller, exporter.registry
        outputs = []
        for style in ("logfmt", "json"):
            stream = io.StringIO()
            setup_logging("debug", style, Redactor(config.api.api_key), stream)
            try:
                poller.run_pending()
                logging.getLogger("test").exception("boom", exc_info=RuntimeError(TEST_KEY))
            finally:
                setup_logging("info", "logfmt", Redactor())
            clock.advance(3600)
            outputs.append(stream.getvalue())
        page = render_landing(book, "/metrics", clock)
        exposition = generate_latest(registry).decode()
        assert "http_500" in exposition and "invalid_response" in exposition
        assert "apiKey=&lt;redacted&gt;" in page  # the quoted URL is shown, scrubbed
        for text in (*outputs, page, exposition):
            assert TEST_KEY not in text
        assert "apiKey=<redacted>" in outputs[0] and "boom" in outputs[1]


@pytest.mark.e2e
def test_once_prints_nothing_of_the_key(crafted: Crafted, tmp_path: Path) -> None:
    server = crafted(echo)
    messages = "".join(f"  - id: {kind}\n" for kind in KINDS if kind != "xml")
    (tmp_path / "c.yaml").write_text(f"api: {{base_url: '{server.url}'}}\nmessages:\n{messages}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "--once",
            "--log.level",
            "debug",
            "--config.file",
            str(tmp_path / "c.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "MAILPARTNER_API_KEY": TEST_KEY},
    )
    assert result.returncode == 1
    assert "poll failed" in result.stderr
    assert TEST_KEY not in result.stdout + result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "broken",
    [
        'api:\n  api_key: "{key}\n',  # an unterminated string holding the key
        "api:\n  api_key: {key}\n  api_key: {key}\n",  # the key twice
        "api:\n  api_key: {key}\n  timeout: [{key}]\n",  # the key where a duration belongs
        "api:\n  api_key: [{key}]\n",
        "api:\n  api_key: {key}\n  timeout: {key}\n",  # quoted back as "not a duration"
        "messages:\n  - id: {key} {key}\n",
    ],
)
def test_config_errors_never_quote_the_key(broken: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(broken.format(key=TEST_KEY))
    check = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--config.file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 1 and str(path) in check.stderr
    assert TEST_KEY not in check.stdout + check.stderr


def test_a_failed_reload_over_http_does_not_show_the_key(crafted: Crafted, tmp_path: Path) -> None:
    server = crafted(echo)
    path = tmp_path / "c.yaml"
    path.write_text(f"api: {{base_url: '{server.url}', api_key: {TEST_KEY}}}\n")
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    web = exporter.serve("127.0.0.1:0", "/metrics", lifecycle=True)
    try:
        path.write_text(f"api:\n  api_key: {TEST_KEY}\n  timeout: [{TEST_KEY}]\n")
        answer = requests.post(f"http://127.0.0.1:{web.server_port}/-/reload", timeout=5)
        assert answer.status_code == 500 and "api.timeout" in answer.text
        assert TEST_KEY not in answer.text
    finally:
        web.shutdown()
        web.server_close()
