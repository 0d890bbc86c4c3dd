"""The path users run: the real exporter process, polling the simulator, scraped as Prometheus
scrapes it, its memory read from ``/proc``.

Three processes: the simulator (``World`` + ``SimulatorServer``, in a child of this module so
that serving polls never shares a GIL with the scrapes timed here), the exporter started as
``python -m exporter --config.file ... --web.listen-address ...`` with half its messages in the
config's ``messages`` and half in ``message_files``, state saving on, a budget of
1900 requests/min (the simulator refuses more than 2000/min per IP); and this one, scraping
``/metrics`` with Prometheus's own ``Accept`` and ``Accept-Encoding`` headers every few seconds
and reading the exporter's ``VmRSS`` and ``VmHWM`` (peak) from ``/proc/<pid>/status``. The
baseline "imports alone" is a process that only imports ``exporter.cli``, read the same way in
the same run. A scrape is timed to the last byte as sent (gzip not decoded).

``--scenario transactional``: 30,000 one-recipient sends (a transactional stream: campaigns
password-reset and invoice), defaults otherwise (schedule, ``per_message_limit: 1000``).
Printed: requests per message so far, scrape p50/p95 and bytes, per-message series sets in
the scrape (target <= 1000), RSS after start, at the end and at its peak (target <= 120 MB).

``--scenario per-message``: 10,000 sends of 100 recipients, ``per_message_limit: 10000`` and
a fast schedule (every 20 s: budget-bound, so every message is polled as often as 1900/min
allows). Phase 1 polls and scrapes (RSS target <= 100 MB, read before phase 2); phase 2 goes
on polling and alternates the fast answer with prometheus_client's own OpenMetrics path over
the same samples (``/metrics?name[]=...`` naming every sample name present, same headers),
each of those checked sample by sample against the fast answers just before and after it.
Target: the fast p50 at most 1/10 of prometheus_client's.

At 1900 requests/min a message poll costs 1/32 s: 30,000 messages take 16 min to be polled
once each and 10,000 take 5 min, so a run of a few minutes polls only part of them. How many
were polled, and how often, is printed beside the figures; ``--seconds`` runs longer.

    python -m benchmarks.bench_process --scenario transactional|per-message [--seconds S]
"""

from __future__ import annotations

import argparse
import gzip
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import requests

from benchmarks.common import Result, print_results

KEY = "bench-key"
BUDGET = 1900  # requests/min: under the simulator's 2000/min per IP
MB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
# What a Prometheus sends when it scrapes (its default scrape protocols, gzip accepted).
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# Gauges computed from the clock or the schedule at each scrape: between two scrapes they may
# move either way, so a value outside the two fast answers' range is no evidence of a mismatch.
LIVE = frozenset(
    {
        "mailpartner_exporter_poll_delay_seconds",
        "mailpartner_exporter_overdue_messages",
        "mailpartner_exporter_scheduled_requests_per_minute",
        "mailpartner_exporter_messages",
    }
)
_MESSAGE_ID = re.compile(rb'message_id="([^"]*)"')
_POLLS_MADE = re.compile(rb'^mailpartner_api_requests_total\{endpoint="bulk-status"\} (\S+)$', re.M)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    messages: int
    recipients: int
    campaigns: tuple[str, ...]
    rss_target_mb: float
    seconds: float  # of polling and scraping before the RSS is judged
    per_message_limit: int | None = None  # None: the default (1000)
    fast_schedule: bool = False  # every 20 s until 48 h, instead of the default schedule
    compare_pairs: int = 0  # phase 2: fast / prometheus_client alternations
    id_base: int = 7_000_000


SCENARIOS = {
    "transactional": Scenario(
        "transactional",
        "transactional: 30,000 one-recipient messages, defaults",
        messages=30_000,
        recipients=1,
        campaigns=("password-reset", "invoice"),
        rss_target_mb=120.0,
        seconds=80.0,
    ),
    "per-message": Scenario(
        "per-message",
        "10,000 messages of 100 recipients, per_message_limit 10000",
        messages=10_000,
        recipients=100,
        campaigns=tuple(f"newsletter-{i:02d}" for i in range(40)),
        rss_target_mb=100.0,
        seconds=110.0,
        per_message_limit=10_000,
        fast_schedule=True,
        compare_pairs=8,
        id_base=4_000_000,
    ),
}


def sends(scenario: Scenario, count: int) -> list[tuple[str, str]]:
    """(message ID, campaign) of every send, the same in the simulator and the config."""
    return [
        (str(scenario.id_base + i), scenario.campaigns[i % len(scenario.campaigns)])
        for i in range(count)
    ]


# -- the simulator, in its own process ---------------------------------------------------------


def serve_simulator(scenario: Scenario, count: int) -> None:
    """Make the sends, print the API's URL, serve until stdin closes."""
    from exporter.simulator import SimulatorServer, World  # noqa: PLC0415 - the child only

    world = World(seed=1)
    for message_id, campaign in sends(scenario, count):
        world.send(scenario.recipients, message_id=message_id, campaign=campaign)
    with SimulatorServer(world, api_key=KEY) as sim:
        print(sim.url, flush=True)
        sys.stdin.read()


@contextmanager
def simulator(scenario: Scenario, count: int) -> Iterator[str]:
    command = [sys.executable, "-m", "benchmarks.bench_process", "--simulator"]
    command += ["--scenario", scenario.name, "--messages", str(count)]
    with subprocess.Popen(  # noqa: S603 - this interpreter, this module
        command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            if not url.startswith("http://"):
                raise RuntimeError(f"the simulator did not start: {url!r}")
            yield url
        finally:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(30)


def sim_polls(url: str) -> dict[str, int]:
    """Bulk-status requests the simulator received, per message ID."""
    root = url.removesuffix("/v1")
    response = requests.get(f"{root}/sim/stats", timeout=30)
    response.raise_for_status()
    polls: dict[str, int] = response.json()["polls"]
    return polls


# -- memory ------------------------------------------------------------------------------------


def memory(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (resident at its peak) of ``pid``, in bytes."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0]) * 1024  # kB
    return figures


def imports_alone() -> dict[str, int]:
    """The memory of a process that only imports the exporter, read from outside as above."""
    code = "import sys, exporter.cli; print('imported', flush=True); sys.stdin.read()"
    with subprocess.Popen(  # noqa: S603 - this interpreter
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        process.stdout.readline()
        figures = memory(process.pid)
        process.stdin.close()
        process.wait(30)
    return figures


# -- the exporter ------------------------------------------------------------------------------


def entries(messages: list[tuple[str, str]]) -> str:
    return "".join(f'  - {{id: "{i}", labels: {{campaign: {c}}}}}\n' for i, c in messages)


def write_config(folder: Path, scenario: Scenario, url: str, files: int = 10) -> Path:
    """Half the messages in ``messages``, half in ``files`` files under ``messages.d``."""
    everything = sends(scenario, scenario.messages)
    half = len(everything) // 2
    inline, listed = everything[:half], everything[half:]
    (folder / "messages.d").mkdir()
    per_file = -(-len(listed) // files)
    for n in range(files):
        part = listed[n * per_file : (n + 1) * per_file]
        (folder / "messages.d" / f"batch-{n:02d}.yaml").write_text("messages:\n" + entries(part))
    text = (
        f"api: {{base_url: {url}, api_key: {KEY}, max_requests_per_minute: {BUDGET},"
        " concurrency: 8}\n"
        f"state: {{path: {folder / 'state.db'}}}\n"
        'message_files: ["messages.d/*.yaml"]\n'
    )
    if scenario.fast_schedule:
        text += "polling: {schedule: [{until: 48h, every: 20s}]}\n"
    if scenario.per_message_limit is not None:
        text += f"metrics: {{per_message_limit: {scenario.per_message_limit}}}\n"
    config = folder / "config.yaml"
    config.write_text(text + "messages:\n" + entries(inline))
    return config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def exporter(
    config: Path, log: IO[str], flags: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The exporter as users start it; yields it and its base URL once ``/-/ready`` is 200.
    On the way out: SIGTERM, and the exit (state saved) awaited."""
    port = free_port()
    command = [sys.executable, "-m", "exporter", "--config.file", str(config), *flags]
    command += ["--web.listen-address", f"127.0.0.1:{port}"]
    base = f"http://127.0.0.1:{port}"
    with subprocess.Popen(  # noqa: S603 - this interpreter, the exporter
        command, cwd=config.parent, stdout=log, stderr=subprocess.STDOUT, text=True
    ) as process:
        try:
            deadline = time.monotonic() + 120
            while not ready(base):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the exporter did not start (exit {process.returncode})")
                time.sleep(0.1)
            yield process, base
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()


def ready(base: str) -> bool:
    try:
        return requests.get(f"{base}/-/ready", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


@dataclass
class Scrape:
    ms: float
    wire: int  # bytes as sent (gzip)
    body: bytes  # decoded


def scrape(session: requests.Session, url: str) -> Scrape:
    """One scrape with Prometheus's headers, timed to the last byte as sent."""
    start = time.perf_counter()
    with session.get(url, headers=PROMETHEUS_HEADERS, stream=True, timeout=120) as response:
        response.raise_for_status()
        raw: bytes = response.raw.read(decode_content=False)
        ms = (time.perf_counter() - start) * 1000
        if not response.headers.get("Content-Type", "").startswith(OPENMETRICS):
            raise AssertionError(f"not OpenMetrics 1.0.0: {response.headers.get('Content-Type')}")
        packed = response.headers.get("Content-Encoding") == "gzip"
    return Scrape(ms, len(raw), gzip.decompress(raw) if packed else raw)


def samples(body: bytes) -> dict[str, float]:
    """Sample lines of an OpenMetrics answer: series (name and labels) -> value."""
    text = body.decode()
    if not text.endswith("# EOF\n"):
        raise AssertionError("an OpenMetrics answer ends with # EOF")
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            if series in found:
                raise AssertionError(f"{series} twice in one answer")
            found[series] = float(value)
    return found


def family(series: str) -> str:
    name = series.partition("{")[0]
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def sample_value(found: dict[str, float], name: str) -> float:
    return sum(v for k, v in found.items() if k.partition("{")[0] == name)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Run:
    """What one scenario measured."""

    imports: dict[str, int]
    start_seconds: float = 0.0
    after_start: dict[str, int] = field(default_factory=dict)
    # (seconds in, VmRSS, bulk-status requests the exporter has made) after each scrape
    rss: list[tuple[float, int, int]] = field(default_factory=list)
    judged: dict[str, int] = field(default_factory=dict)  # VmRSS, VmHWM when the target is read
    scrapes: list[Scrape] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)
    last_body: bytes = b""
    polls: dict[str, int] = field(default_factory=dict)
    polled_for: float = 0.0  # seconds from the exporter's start to reading ``polls``
    fast: list[float] = field(default_factory=list)  # phase 2
    slow: list[float] = field(default_factory=list)
    slow_wire: int = 0
    slow_size: int = 0  # decoded
    fast_size: int = 0
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    names: int = 0
    peak_after: int = 0  # VmHWM at exit, the prometheus_client path included
    rss_before_exit: int = 0
    exit_seconds: float = 0.0
    exit_code: int | None = None


def wait_tracked(session: requests.Session, url: str, count: int, timeout: float = 120) -> None:
    """Until the exporter says it tracks ``count`` messages (config and files read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = samples(scrape(session, url).body)
        if sample_value(found, "mailpartner_exporter_messages") >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the exporter never tracked {count:,} messages")


def poll_and_scrape(
    session: requests.Session, url: str, pid: int, run: Run, *, seconds: float, every: float
) -> None:
    """Scrape every ``every`` seconds for ``seconds``, reading the RSS after each."""
    start = time.monotonic()
    tick = start
    while tick - start < seconds:
        result = scrape(session, url)
        run.scrapes.append(Scrape(result.ms, result.wire, b""))
        run.last_body = result.body
        made = _POLLS_MADE.search(result.body)
        rss = memory(pid)["VmRSS"]
        run.rss.append((time.monotonic() - start, rss, int(float(made.group(1))) if made else 0))
        tick += every
        time.sleep(max(0.0, tick - time.monotonic()))


def compare(session: requests.Session, url: str, pairs: int, run: Run) -> None:
    """Fast answers and prometheus_client's ``name[]`` answers, alternately; each of the
    latter checked against the fast answers just before and just after it."""
    before = scrape(session, url)
    found = samples(before.body)
    names = sorted({k.partition("{")[0] for k in found} | {family(k) for k in found})
    run.names = len(names)
    query = urllib.parse.urlencode([("name[]", n) for n in names])
    run.fast.append(before.ms)
    for _ in range(pairs):
        slow = scrape(session, f"{url}?{query}")
        after = scrape(session, url)
        run.slow.append(slow.ms)
        run.fast.append(after.ms)
        run.slow_wire, run.slow_size, run.fast_size = slow.wire, len(slow.body), len(after.body)
        run.mismatches += mismatches(samples(before.body), samples(slow.body), samples(after.body))
        run.compared += 1
        before = after
        time.sleep(1.0)


def mismatches(
    before: dict[str, float], slow: dict[str, float], after: dict[str, float]
) -> list[str]:
    """Series of ``slow`` not explained by the fast answers around it: present in neither,
    missing though present in both, or (unless LIVE) a value outside theirs."""
    wrong = [f"missing {k}" for k in (before.keys() & after.keys()) - slow.keys()]
    for key, value in slow.items():
        if key not in before and key not in after:
            wrong.append(f"extra {key}")
        elif key in before and key in after and family(key) not in LIVE:
            low, high = sorted((before[key], after[key]))
            if not low <= value <= high:
                wrong.append(f"{key} {value:g} not within [{low:g}, {high:g}]")
    return wrong


def measure(scenario: Scenario, seconds: float, every: float, pairs: int) -> Run:
    run = Run(imports_alone())
    with (
        simulator(scenario, scenario.messages) as url,
        tempfile.TemporaryDirectory(prefix="bench-process-") as tmp,
    ):
        folder = Path(tmp)
        config = write_config(folder, scenario, url)
        with (
            open(folder / "exporter.log", "w") as log,
            requests.Session() as session,
        ):
            started = time.monotonic()
            try:
                with exporter(config, log) as (process, base):
                    metrics = f"{base}/metrics"
                    wait_tracked(session, metrics, scenario.messages)
                    run.start_seconds = time.monotonic() - started
                    run.after_start = memory(process.pid)
                    poll_and_scrape(
                        session, metrics, process.pid, run, seconds=seconds, every=every
                    )
                    run.judged = memory(process.pid)
                    run.last = samples(run.last_body)
                    run.polls = sim_polls(url)
                    run.polled_for = time.monotonic() - started
                    compare(session, metrics, pairs, run)
                    before_exit = memory(process.pid)
                    run.peak_after, run.rss_before_exit = before_exit["VmHWM"], before_exit["VmRSS"]
                    stopping = time.monotonic()
                    process.terminate()
                    while process.poll() is None:  # the state is saved on the way out
                        # A zombie's status has no Vm lines: .get
                        run.peak_after = max(run.peak_after, memory(process.pid).get("VmHWM", 0))
                        time.sleep(0.05)
                    run.exit_seconds = time.monotonic() - stopping
                    run.exit_code = process.returncode
            except Exception:
                log.flush()
                print((folder / "exporter.log").read_text()[-4000:], file=sys.stderr)
                raise
    return run


# -- figures -----------------------------------------------------------------------------------


def results(scenario: Scenario, run: Run, seconds: float) -> list[Result]:
    imports = run.imports["VmRSS"] / MB
    target = scenario.rss_target_mb
    polls = run.polls
    requests_made = sum(polls.values())
    per_message = requests_made / scenario.messages
    histogram = Counter(polls.get(i, 0) for i, _ in sends(scenario, scenario.messages))
    spread = ", ".join(f"{n}x: {histogram[n]:,}" for n in sorted(histogram))
    times = [s.ms for s in run.scrapes]
    p50, p95 = percentile(times, 0.5), percentile(times, 0.95)
    ids = {m.group(1) for m in _MESSAGE_ID.finditer(run.last_body)}
    rss_end, peak = run.judged["VmRSS"], run.judged["VmHWM"]
    # The second half: caches and threads warmed up, each poll a message's first.
    half = [(rss, made) for t, rss, made in run.rss if t >= seconds / 2]
    drift = (half[-1][0] - half[0][0]) if len(half) > 1 else 0
    slope = drift / max(1, half[-1][1] - half[0][1]) if len(half) > 1 else 0.0
    polled = sum(1 for n in polls.values() if n)
    estimate = rss_end + slope * (scenario.messages - polled)
    out = [
        Result(
            "requests per message so far",
            per_message,
            "req",
            0,
            True,
            f"no target: {requests_made:,} bulk-status requests in {run.polled_for:.0f} s;"
            f" polls per message {spread}",
        ),
        Result(
            "scrape p50 (Prometheus headers)",
            p50,
            "ms",
            0,
            True,
            f"no target here; p95 {p95:.1f} ms over {len(times)} scrapes, every "
            f"{seconds / max(1, len(times)):.0f} s while polling",
        ),
        Result(
            "bytes per scrape (gzip, as sent)",
            float(run.scrapes[-1].wire),
            "B",
            0,
            True,
            f"no target; {len(run.last_body):,} B decoded, {len(run.last):,} samples",
        ),
    ]
    limit = scenario.per_message_limit or 1000
    withheld = sample_value(run.last, "mailpartner_exporter_per_message_withheld")
    aggregates = sum(1 for k in run.last if k.startswith("mailpartner_messages_total{"))
    out.append(
        Result(
            "per-message series sets in the scrape",
            float(len(ids)),
            "sets",
            limit,
            len(ids) <= limit,
            f"<= per_message_limit {limit:,}; withheld gauge {withheld:,.0f}; "
            f"aggregates for {aggregates} label sets",
        )
    )
    out += [
        Result(
            "RSS after start",
            run.after_start["VmRSS"] / MB,
            "MB",
            0,
            True,
            f"no target; all {scenario.messages:,} tracked after {run.start_seconds:.1f} s; "
            f"imports alone {imports:.1f} MB",
        ),
        Result(
            "RSS at the end of polling",
            rss_end / MB,
            "MB",
            target,
            rss_end <= target * MB,
            f"<= {target:g} MB; imports alone {imports:.1f} MB; {drift / MB:+.1f} MB over the"
            f" second half; {polled / scenario.messages:.0%} of the messages polled yet",
        ),
        Result(
            "RSS growth per poll, second half",
            slope / 1024,
            "KiB",
            0,
            True,
            f"no target: ΔVmRSS / Δ bulk-status requests; were every message polled:"
            f" ≈ {estimate / MB:.0f} MB (estimate, {polled:,} of {scenario.messages:,} polled)",
        ),
        Result(
            "RSS peak (VmHWM)",
            peak / MB,
            "MB",
            target,
            peak <= target * MB,
            f"<= {target:g} MB; imports alone peak {run.imports['VmHWM'] / MB:.1f} MB",
        ),
    ]
    if run.slow:
        fast, slow = statistics.median(run.fast), statistics.median(run.slow)
        speedup = slow / fast
        out += [
            Result(
                "scrape p50 vs prometheus_client OpenMetrics",
                speedup,
                "x faster",
                10,
                speedup >= 10,
                f">= 10x (<= 1/10): name[] path p50 {slow:,.0f} ms ({run.slow_wire:,} B gzip) /"
                f" fast p50 {fast:.1f} ms; {len(run.slow)} and {len(run.fast)} scrapes",
            ),
            Result(
                "name[] answers, samples unexplained",
                float(len(run.mismatches)),
                "samples",
                0,
                not run.mismatches,
                f"0: {run.compared} answers naming {run.names} names, each against the fast"
                f" answers before and after it ({run.slow_size:,} B decoded, fast"
                f" {run.fast_size:,} B)"
                + (f"; first: {run.mismatches[0]}" if run.mismatches else ""),
            ),
        ]
    out.append(
        Result(
            "RSS peak to exit",
            run.peak_after / MB,
            "MB",
            0,
            True,
            f"no target: VmHWM through {'phase 2 and ' if run.slow else ''}SIGTERM "
            f"(exit {run.exit_code} after {run.exit_seconds:.1f} s, state saved);"
            f" VmRSS {run.rss_before_exit / MB:.1f} MB at SIGTERM",
        )
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="transactional")
    parser.add_argument("--seconds", type=float, default=None, help="of polling (phase 1)")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between scrapes")
    parser.add_argument("--pairs", type=int, default=None, help="phase 2 comparisons")
    parser.add_argument("--simulator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    scenario = SCENARIOS[args.scenario]
    if args.simulator:
        serve_simulator(scenario, args.messages or scenario.messages)
        return 0
    seconds = scenario.seconds if args.seconds is None else args.seconds
    pairs = scenario.compare_pairs if args.pairs is None else args.pairs
    run = measure(scenario, seconds, args.every, pairs)
    out = results(scenario, run, seconds)
    print_results(f"Real process, {scenario.title} ({seconds:.0f} s of polling)", out)
    if run.exit_code != 0:
        print(f"  the exporter exited with {run.exit_code}")
        return 1
    return 0 if all(r.ok for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
