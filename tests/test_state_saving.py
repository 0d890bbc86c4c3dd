"""When the state cannot be saved: counted, logged once a minute, and said in the answer of a
registration that would not survive a restart. A real full disk: a small tmpfs, filled."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
import requests

from exporter.domain import MessageSpec
from exporter.simulator import SimulatorServer, World
from exporter.sources.saving import LOG_EVERY, Saver
from exporter.state import StateStore, StateStoreError
from tests.conftest import TEST_KEY, FakeClock
from tests.stack import start_exporter, wait_until


class _FullStore(StateStore):
    """A store whose disk is full until ``full`` is set to False."""

    full = True

    def save_registrations(self, changes: object) -> None:  # type: ignore[override]
        if self.full:
            raise StateStoreError(f"cannot save state to {self.path}: database or disk is full")


def test_failures_are_counted_and_logged_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = _FullStore(str(tmp_path / "state.db"), source="bulk_status")
    saver = Saver(store, clock)
    spec = MessageSpec("1", MappingProxyType({}))
    caplog.set_level(logging.INFO, "exporter.sources.saving")
    for _ in range(81):  # one registration every 0.3 s for about 25 s
        assert not saver.save_registrations({"1": spec})
        clock.advance(0.3)
    assert saver.failures == 81
    assert saver.volatile == f"cannot save state to {store.path}: database or disk is full"
    lines = [r for r in caplog.records if r.getMessage() == "cannot save state"]
    assert len(lines) == 1
    clock.advance(LOG_EVERY)
    assert not saver.save_registrations({"1": spec})
    lines = [r for r in caplog.records if r.getMessage() == "cannot save state"]
    assert [r.failures for r in lines] == [1, 81]  # type: ignore[attr-defined]
    store.full = False
    assert saver.save_registrations({"1": spec})
    assert saver.volatile is None
    assert caplog.records[-1].getMessage() == "state saved again"


@contextlib.contextmanager
def small_disk(path: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``: a disk that can be filled."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    refused = subprocess.run(mount, capture_output=True, text=True, check=False)
    if refused.returncode != 0:  # not root, or a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a small tmpfs here: {refused.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return filler


@pytest.mark.e2e
def test_a_full_disk_is_counted_said_in_the_answer_and_logged_once(tmp_path: Path) -> None:
    with (
        SimulatorServer(World(seed=3), api_key=TEST_KEY) as upstream,
        small_disk(tmp_path / "disk") as disk,
    ):
        config = tmp_path / "config.yaml"
        config.write_text(
            f"api: {{base_url: {upstream.url}, api_key: {TEST_KEY}}}\n"
            f"state: {{path: {disk / 'state.db'}}}\n"
        )
        exporter = start_exporter(
            tmp_path, "--config.file", str(config), "--web.enable-registration"
        )
        endpoint = f"{exporter.url}/api/v1/messages"
        try:
            first = requests.post(endpoint, json={"id": "1"}, timeout=5)
            assert (first.status_code, "warnings" in first.json()) == (201, False)
            filler = fill(disk)
            for n in range(2, 42):
                answer = requests.post(endpoint, json={"id": str(n)}, timeout=5)
                assert answer.status_code == 201  # tracked all the same
                (warning,) = answer.json()["warnings"]
                assert "disk is full" in warning and "will not survive a restart" in warning
            metrics = requests.get(f"{exporter.url}/metrics", timeout=5).text
            assert "mailpartner_exporter_state_save_failures_total 40.0" in metrics
            filler.unlink()
            last = requests.post(endpoint, json={"id": "99"}, timeout=5)
            assert (last.status_code, "warnings" in last.json()) == (201, False)
            wait_until(lambda: "state saved again" in exporter.log.read_text(), 5, "recovery")
        finally:
            exporter.process.send_signal(signal.SIGTERM)
            exporter.process.wait(10)
            exporter.stop()
        log = exporter.log.read_text()
        assert log.count('msg="cannot save state"') == 1, log
