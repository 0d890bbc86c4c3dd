"""Twenty scrapers at once while the poller is busy: no errors, no deadlock, valid output."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter, load_runnable
from exporter.simulator import SimulatorServer, World
from tests.conftest import TEST_KEY

SCRAPERS = 20
SECONDS = 3.0


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
                        "concurrency": 8,
                    },
                    "polling": {"schedule": [{"until": "48h", "every": "1s"}]},
                    "messages": [{"id": i, "labels": {"campaign": "load"}} for i in ids],
                }
            )
        )
        exporter = Exporter(load_runnable(str(path), demo=False), str(path))
        server = exporter.serve("127.0.0.1:0", "/metrics")
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        loop = threading.Thread(target=exporter.run, args=(server,))
        loop.start()
        try:
            deadline = time.monotonic() + SECONDS

            def scrape(worker: int) -> int:
                session = requests.Session()
                done = 0
                while time.monotonic() < deadline:
                    gzip = worker % 2 == 0  # half of them ask for gzip
                    headers = {} if gzip else {"Accept-Encoding": "identity"}
                    response = session.get(url, headers=headers, timeout=10)
                    assert response.status_code == 200
                    families = {f.name for f in text_string_to_metric_families(response.text)}
                    assert {"mailpartner_message_recipients", "mailpartner_up"} <= families
                    done += 1
                return done

            with ThreadPoolExecutor(SCRAPERS) as pool:
                scrapes = list(pool.map(scrape, range(SCRAPERS)))
        finally:
            exporter.request_stop()
            loop.join(15)
        assert not loop.is_alive()
        polls = sum(upstream.stats().polls.values())
        print(f"{sum(scrapes)} scrapes and {polls} polls in {SECONDS:g}s")
        assert min(scrapes) >= 1  # every scraper got answers
        assert polls > 8  # and the poller went on past its first burst meanwhile
