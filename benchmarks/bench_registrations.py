"""Registrations over HTTP as a sending application makes them: one ``POST /api/v1/messages``
after each send, over one keep-alive connection, to the real exporter process.

The exporter (``--web.enable-registration``, state saving on, budget 1900/min) polls the
simulator (in a child process) for the registered messages while they come. Timed: the rate
of registrations (and of deletes) with nothing registered yet (the baseline, same run) and
with ``--held`` (20,000) registered already. Target: at least 200 registrations a second with
20,000 held, that is a cost per registration that does not grow with the registrations held.
RSS is read from ``/proc`` at the end.

    python -m benchmarks.bench_registrations [--held N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.bench_process import BUDGET, KEY, MB, SCENARIOS, exporter, memory, simulator
from benchmarks.common import Result, print_results

TARGET = 200.0  # registrations a second with --held registered
SAMPLE = 1000  # registrations timed at each point


def register(connection: http.client.HTTPConnection, ids: range, campaign: str) -> float:
    """POST each ID in turn; the rate, per second."""
    started = time.perf_counter()
    for n in ids:
        body = json.dumps({"id": str(n), "labels": {"campaign": campaign}})
        connection.request("POST", "/api/v1/messages", body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        answer.read()
        if answer.status != 201:
            raise RuntimeError(f"registration of {n}: HTTP {answer.status}")
    return len(ids) / (time.perf_counter() - started)


def delete(connection: http.client.HTTPConnection, ids: range) -> float:
    started = time.perf_counter()
    for n in ids:
        connection.request("DELETE", f"/api/v1/messages/{n}")
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"delete of {n}: HTTP {answer.status}")
    return len(ids) / (time.perf_counter() - started)


def fill(host: str, port: int, ids: range, connections: int = 4) -> None:
    """Register ``ids`` over a few connections at once (not timed)."""
    step = -(-len(ids) // connections)

    def part(chunk: range) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        register(connection, chunk, "filler")
        connection.close()

    threads = [
        threading.Thread(target=part, args=(ids[i : i + step],)) for i in range(0, len(ids), step)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--held", type=int, default=20_000)
    held = parser.parse_args().held
    scenario = SCENARIOS["transactional"]
    base_id = scenario.id_base
    total = held + 3 * SAMPLE
    with tempfile.TemporaryDirectory() as tmp, simulator(scenario, total) as url:
        folder = Path(tmp)
        config = folder / "config.yaml"
        config.write_text(
            f"api: {{base_url: {url}, api_key: {KEY}, max_requests_per_minute: {BUDGET},"
            " concurrency: 8}\n"
            f"state: {{path: {folder / 'state.db'}}}\n"
        )
        with (
            (folder / "exporter.log").open("w") as log,
            exporter(config, log, ("--web.enable-registration",)) as (process, base),
        ):
            host, port = base.removeprefix("http://").split(":")
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            empty = register(connection, range(base_id, base_id + SAMPLE), "timed")
            empty_delete = delete(connection, range(base_id, base_id + SAMPLE // 2))
            fill(host, int(port), range(base_id + SAMPLE, base_id + SAMPLE + held))
            # The first connection sat idle longer than the server keeps one: a fresh one.
            connection.close()
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            start = base_id + SAMPLE + held
            loaded = register(connection, range(start, start + SAMPLE), "timed")
            loaded_delete = delete(connection, range(start, start + SAMPLE // 2))
            rss = memory(process.pid)
    results = [
        Result(
            f"registrations/s, {held:,} held",
            loaded,
            "/s",
            TARGET,
            loaded >= TARGET,
            f"{loaded / empty:.2f}x the rate with none held ({empty:,.0f}/s, same run)",
        ),
        Result(
            f"deletes/s, {held:,} held",
            loaded_delete,
            "/s",
            TARGET,
            loaded_delete >= TARGET,
            f"{loaded_delete / empty_delete:.2f}x with none held ({empty_delete:,.0f}/s)",
        ),
        Result(
            "RSS at the end", rss["VmRSS"] / MB, "MB", 0, True, f"peak {rss['VmHWM'] / MB:.0f} MB"
        ),
    ]
    print_results("registrations over HTTP (real process, keep-alive)", results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
