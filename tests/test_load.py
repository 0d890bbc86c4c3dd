"""Twenty scrapers at once while the poller is busy: no errors, no deadlock, valid output."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter, load_runnable
from exporter.simulator import SimulatorServer, World
from tests.conftest import TEST_KEY

SCRAPERS = 20
SCRAPES = 2  # each, at least: a second on the same keep-alive connection
CONCURRENCY = 8
# Polls answered while the scrapers run, well past the first burst (the bucket holds one
# request per connection): the poller is not starved or blocked by scrapes.
POLLS_MEANWHILE = 4 * CONCURRENCY
# A failure guard against a deadlock, not a measurement: the test ends on counts.
PATIENCE = 60.0


@pytest.mark.e2e  # 40-odd scrapes of 150 messages, each parsed: seconds of CPU
def test_concurrent_scrapes_during_heavy_polling(tmp_path: Path) -> None:
    with SimulatorServer(World(seed=2), api_key=TEST_KEY) as upstream:
        ids = [upstream.world.send(300).message_id for _ in range(150)]
        path = tmp_path / "config.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "api": {
                        "base_url": upstream.url,
                        "api_key": TEST_KEY,
                        "max_requests_per_minute": 1900,
                        "concurrency": CONCURRENCY,
                    },
                    "polling": {"schedule": [{"until": "48h", "every": "1s"}]},
                    "messages": [{"id": i, "labels": {"campaign": "load"}} for i in ids],
                }
            )
        )
        exporter = Exporter(load_runnable(str(path), demo=False), str(path))
        server = exporter.serve("127.0.0.1:0", "/metrics")
        url = f"http://127.0.0.1:{server.server_port}/metrics"

        def polls() -> int:
            return sum(upstream.stats().polls.values())

        loop = threading.Thread(target=exporter.run, args=(server,))
        loop.start()
        try:
            before = polls()
            give_up = time.monotonic() + PATIENCE

            def scrape(worker: int) -> int:
                session = requests.Session()
                done = 0
                # Every scraper keeps going until the poller has shown it polls meanwhile.
                while done < SCRAPES or polls() - before < POLLS_MEANWHILE:
                    if time.monotonic() > give_up:
                        raise AssertionError(
                            f"scraper {worker}: {done} scrapes, {polls() - before} polls"
                            f" meanwhile, after {PATIENCE:g}s"
                        )
                    gzip = worker % 2 == 0  # half of them ask for gzip
                    headers = {} if gzip else {"Accept-Encoding": "identity"}
                    response = session.get(url, headers=headers, timeout=PATIENCE)
                    assert response.status_code == 200
                    families = {f.name for f in text_string_to_metric_families(response.text)}
                    assert {"mailpartner_message_recipients", "mailpartner_up"} <= families
                    done += 1
                return done

            with ThreadPoolExecutor(SCRAPERS) as pool:
                scrapes = list(pool.map(scrape, range(SCRAPERS)))
            meanwhile = polls() - before
        finally:
            exporter.request_stop()
            loop.join(15)
        assert not loop.is_alive()
        print(f"{sum(scrapes)} scrapes and {meanwhile} polls meanwhile")
