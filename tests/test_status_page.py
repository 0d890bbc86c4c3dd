"""The status page as a person sees it: rendered by headless Chromium, checked against /metrics."""

from __future__ import annotations

import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_tool
from tests.stack import REPO

# CI keeps what lands here; locally it is git-ignored.
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))


class _Rows(HTMLParser):
    """Per message row: its ID and the numbers in its state cells, as rendered."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.order: list[str] = []
        self._row: str | None = None
        self._state: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr" and found.get("data-message-id"):
            self._row = found["data-message-id"]
            self.order.append(self._row or "")
            self.rows[self._row or ""] = {}
        elif tag == "td" and found.get("data-state") and self._row:
            self._state = found["data-state"]

    def handle_data(self, data: str) -> None:
        if self._row and self._state:
            self.rows[self._row][self._state] = data.strip()
            self._state = None


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    # Flags that keep Chromium off the network it cannot reach here.
    return subprocess.run(
        [
            require_tool("chromium"),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        timeout=90,
        check=False,
    )


@pytest.mark.e2e
def test_rendered_table_matches_the_metrics_and_is_screenshotted(
    scenario_url: str, tmp_path: Path
) -> None:
    rendered = chromium(tmp_path / "profile", "--dump-dom", scenario_url)
    assert rendered.returncode == 0, rendered.stderr.decode()[-2000:]
    parser = _Rows()
    parser.feed(rendered.stdout.decode())
    assert parser.order == ["301", "302", "300"]  # newest send first

    exposition = requests.get(f"{scenario_url}/metrics", timeout=5).text
    polled = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "mailpartner_message_recipients":
                polled.setdefault(sample.labels["message_id"], {})[sample.labels["state"]] = str(
                    int(sample.value)
                )
    assert (
        parser.rows["300"]
        == polled["300"]
        == {"delivered": "2", "failed": "0", "pending": "0", "unknown": "0"}
    )
    assert parser.rows["301"] == polled["301"]
    # 302 was never polled: the page says so instead of showing zeros
    assert set(parser.rows["302"].values()) == {"\u2013"}  # an en dash

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    taken = chromium(
        tmp_path / "profile", "--window-size=1400,500", f"--screenshot={shot}", scenario_url
    )
    assert taken.returncode == 0, taken.stderr.decode()[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(shot.read_bytes()[16:20], "big") == 1400  # PNG width
