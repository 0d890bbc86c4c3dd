"""Big sends in bounded memory: one bulk-status body of a million recipients, streamed.

The body (the documented shape, a realistic mix of statuses) is written once to a temporary
file and served over loopback by a child process, plain and gzip-encoded. Separate child
processes then fetch it, so each peak RSS (``ru_maxrss``) is that process's alone:

- the exporter: ``MailPartnerClient.bulk_status`` into a ``ReportAggregator``;
- the baseline: ``requests.get(...).json()`` and a Python loop counting states.

Targets: at least 500,000 recipients/s and a peak RSS of at most 150 MB for the whole
process. The machine may be shared and noisy: the ratios to the baseline measured in the
same run say more than the absolute rates.

    python benchmarks/bench_parse.py [--recipients 1000000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from benchmarks.common import Result
from exporter.aggregate import ReportAggregator
from exporter.client import BULK_STATUS, MailPartnerClient
from exporter.config.model import ApiConfig
from exporter.domain import State, StatusMap
from exporter.secret import Redactor, Secret
from exporter.stats import RequestStats

RECIPIENTS = 1_000_000
RATE_TARGET = 500_000.0  # recipients per second
RSS_TARGET_MB = 150.0
ROOT = Path(__file__).resolve().parent.parent
ENCODINGS = ("plain", "gzip")
SIDES = ("exporter", "baseline")
# A realistic mix, in percent: mostly delivered, some pending, a few failures.
STATUSES = ["Delivered"] * 72 + ["Waiting"] * 15 + ["Not delivered"] * 7 + ["Bounced"] * 3
STATUSES += ["Rejected"] * 2 + ["Soft bounce"]
Figures = dict[str, float]


def write_body(path: Path, recipients: int) -> None:
    """The body at ``path``, and gzip-compressed at ``path`` + ``.gz``, in one pass."""
    with path.open("wb") as plain, gzip.open(f"{path}.gz", "wb", compresslevel=6) as packed:
        for part in _body_parts(recipients):
            plain.write(part)
            packed.write(part)


def _body_parts(recipients: int) -> Iterator[bytes]:
    rnd = random.Random(1)  # noqa: S311 - benchmark data, not secrets
    yield b'{"success":true,"code":200,"messageId":"1","StatutResponseList":['
    for start in range(0, recipients, 10_000):
        reports = [
            f'{{"email":"recipient{i}@example.com","token":"{rnd.getrandbits(128):032x}",'
            f'"status":"{rnd.choice(STATUSES)}","cost":0.0105,'
            f'"stopMail":{"true" if rnd.random() < 0.01 else "false"},'
            f'"date":"{1764150000 + rnd.randrange(172_800)}"}}'
            for i in range(start, min(start + 10_000, recipients))
        ]
        yield (b"," if start else b"") + ",".join(reports).encode()
    yield b"]}"


class _Handler(BaseHTTPRequestHandler):
    """``/plain/...`` answers the body as it is, ``/gzip/...`` gzip-encoded."""

    body: Path

    def do_GET(self) -> None:
        gzipped = self.path.startswith("/gzip/")
        path = Path(f"{self.body}.gz") if gzipped else self.body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(path.stat().st_size))
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        with path.open("rb") as file:
            self.connection.sendfile(file)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(body: Path) -> None:
    """Serve ``body`` on a free loopback port, printed first, until terminated."""
    _Handler.body = body
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def exporter_child(url: str) -> Figures:
    config = ApiConfig(base_url=url, api_key=Secret("k"), timeout=120, max_response_bytes=2**31)
    stats = RequestStats([BULK_STATUS])
    client = MailPartnerClient(config, requests.Session(), stats, Redactor(config.api_key))
    started = time.perf_counter()
    aggregate = client.bulk_status("1", ReportAggregator(StatusMap.default()))
    return {"seconds": time.perf_counter() - started, "recipients": aggregate.recipients}


def baseline_child(url: str) -> Figures:
    status_map = StatusMap.default()
    started = time.perf_counter()
    params = {"apiKey": "k", "messageId": "1"}
    document = requests.get(f"{url}/{BULK_STATUS}", params=params, timeout=120).json()
    states = dict.fromkeys(State, 0)
    for report in document["StatutResponseList"]:
        states[status_map.state_of(report["status"])] += 1
    return {"seconds": time.perf_counter() - started, "recipients": sum(states.values())}


def spawn(*args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "benchmarks.bench_parse", *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # noqa: S603 - this interpreter, this module


def child(side: str, url: str) -> Figures:
    """One side in a fresh process: its time, count and peak RSS."""
    output, _ = (process := spawn("--child", side, "--url", url)).communicate()
    if process.returncode:
        raise RuntimeError(f"{side} child failed with status {process.returncode}")
    figures: Figures = json.loads(output)
    return figures


def measure(recipients: int) -> dict[tuple[str, str], Figures]:
    """Rate and peak RSS of each side for each encoding."""
    figures: dict[tuple[str, str], Figures] = {}
    with tempfile.TemporaryDirectory() as directory:
        body = Path(directory) / "bulk-status.json"
        write_body(body, recipients)
        server = spawn("--serve", str(body))
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            for encoding in ENCODINGS:
                for side in SIDES:
                    found = child(side, f"http://127.0.0.1:{port}/{encoding}")
                    if found["recipients"] != recipients:
                        raise RuntimeError(f"{side} counted {found['recipients']:,.0f}")
                    figures[side, encoding] = {
                        "rate": recipients / found["seconds"],
                        "rss": found["peak_mb"],
                    }
        finally:
            server.terminate()
            server.wait()
    return figures


def results(figures: dict[tuple[str, str], Figures]) -> list[Result]:
    found: list[Result] = []
    for encoding in ENCODINGS:
        ours, base = figures["exporter", encoding], figures["baseline", encoding]
        speed = f"baseline {base['rate']:,.0f}/s: {ours['rate'] / base['rate']:.1f}x as fast"
        rss = f"baseline {base['rss']:,.0f} MB: {ours['rss'] / base['rss']:.2f}x of it"
        rate_ok, rss_ok = ours["rate"] >= RATE_TARGET, ours["rss"] <= RSS_TARGET_MB
        found.append(
            Result(f"{encoding}: rate", ours["rate"], "rcpt/s", RATE_TARGET, rate_ok, speed)
        )
        found.append(Result(f"{encoding}: peak RSS", ours["rss"], "MB", RSS_TARGET_MB, rss_ok, rss))
    return found


def run(recipients: int = RECIPIENTS) -> list[Result]:
    return results(measure(recipients))


def print_table(figures: dict[tuple[str, str], Figures]) -> None:
    print(f"{'':<18}{'recipients/s':>14}{'peak RSS MB':>13}{'speed ratio':>13}{'RSS ratio':>11}  ")
    for encoding in ENCODINGS:
        base = figures["baseline", encoding]
        for side in SIDES:
            row = figures[side, encoding]
            verdict = "baseline"
            if side == "exporter":
                ok = row["rate"] >= RATE_TARGET and row["rss"] <= RSS_TARGET_MB
                verdict = "PASS" if ok else "FAIL"
            print(
                f"{side + ', ' + encoding:<18}{row['rate']:>14,.0f}{row['rss']:>13,.1f}"
                f"{row['rate'] / base['rate']:>12.2f}x{row['rss'] / base['rss']:>10.2f}x  {verdict}"
            )
    print(f"targets: >= {RATE_TARGET:,.0f} recipients/s, <= {RSS_TARGET_MB:.0f} MB peak RSS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipients", type=int, default=RECIPIENTS)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.child:
        found = (exporter_child if args.child == "exporter" else baseline_child)(args.url)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({**found, "peak_mb": peak_mb}))
        return 0
    figures = measure(args.recipients)
    print_table(figures)
    return 0 if all(r.ok for r in results(figures)) else 1


if __name__ == "__main__":
    sys.exit(main())
