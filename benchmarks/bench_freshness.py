"""Freshness per request over a week of campaigns: the real scheduler against the simulator.

A discrete-event run on a fake clock (nothing sleeps). ``WEEK_OF_SENDS`` campaigns of
RECIPIENTS recipients are sent through the week of Monday 11 to Sunday 17 May 2026
(Europe/Paris; Thursday 14 is Ascension, a public holiday): a fifth in quiet hours (20:00 to
08:00, the weekend, the holiday), which the platform holds until the next working day's 08:00;
a tenth deferred (``scheduled_at`` on a 5-minute step), half of those into quiet hours, so held
too; the rest in working hours, going out at once. Every campaign is commercial
(``World.send(..., commercial=True)``) and registered as a sending application would: its
``sent_at`` when it is sent, its ``scheduled_at`` if deferred, not transactional. Each is
followed until final. Polls are answered straight from ``World.arrivals`` (no HTTP), counted
from when the send goes out, through the real MessageBook and Poller under the real token
bucket, for three policies over the same sends:

- ours: the shipped defaults (``config.yaml``);
- naive: every message every 60 s, never held, until 48 h after its first report;
- current main: the exporter before the sending calendar (commit ``CURRENT_MAIN``), its own
  code and ``config.yaml`` taken with ``git archive`` and run in a subprocess: age from
  ``sent_at``, final ``final_after`` later, no held or deferred sends.

Figures: first-report freshness of held sends (from the 08:00 release to the exporter's first
count of a report), p95; report freshness (from a report arriving upstream to the exporter's
counts including it, for reports under an hour after the send went out), p50 and p95;
requests per message; messages made final before anything of them was counted (though
their reports came within ``unreported_max``); the most requests in any 60 s window; and, ours
alone, the opening capacity: the most held sends one 08:00 opening can release that still
meet the first-report target. (It replaces the steady-rate capacity of sends that go out at
once, which the calendar hardly changes: with quiet hours, the opening after a weekend is where
the budget binds.)

    python -m benchmarks.bench_freshness [--quick]   # ~50 s; --quick: 14 campaigns, ~6 s
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import datetime as dt
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple
from zoneinfo import ZoneInfo

from benchmarks.common import Result, inline_source, print_results
from exporter.aggregate import MessageAggregate, ReportAggregator
from exporter.client import BULK_STATUS
from exporter.config.loader import load_config
from exporter.config.model import ApiConfig, Config, PollingConfig, ScheduleStep
from exporter.domain import MessageSpec, State
from exporter.simulator import World
from exporter.simulator.model import WAITING
from exporter.sources.registry import available
from exporter.stats import RequestStats

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
RECIPIENTS = 1000
BUDGET = 600
PARIS = ZoneInfo("Europe/Paris")
WEEK = dt.datetime(2026, 5, 11, tzinfo=PARIS).timestamp()  # a Monday; Thursday is Ascension
# 20 campaigns a day: the naive baseline (about 3,000 polls a message, ~0.1 ms each) sets the
# run's length, about 45 s.
WEEK_OF_SENDS = 140
QUIET, DEFERRED = 0.2, 0.1  # shares of the sends made in quiet hours, and deferred
# Deferred by up to this: every send goes out (held or not) well within unreported_max (7 d),
# so a message made final with nothing counted was given up too soon.
LONGEST_DEFERRAL = 3 * DAY
TARGETS = {
    "first_report_p95": 120.0,
    "p50": 60.0,
    "p95": 300.0,
    "requests_per_message": 35.0,
    "finalized_unreported": 0.0,
    "opening": 1000.0,
}
# The exporter as it was before the sending calendar: what "current main" runs.
CURRENT_MAIN = "a00d3a9405619d11ffd6f6951663f22e38131349"


def naive_polling() -> PollingConfig:
    """Every message every 60 s, never held, until 48 h after its first report. (A function:
    current main, which imports this script too, has none of these settings.)"""
    every_minute = (ScheduleStep(until=48 * HOUR, every=60.0),)
    return PollingConfig(schedule=every_minute, unreported_every=60.0, quiet_hours=False)


@dataclasses.dataclass(frozen=True)
class PlannedSend:
    """One send of the week: made at ``sent_at``, deferred to ``scheduled_at`` if not None,
    first delivered at ``goes_out`` (the simulator's, with the platform's hold)."""

    message_id: str
    sent_at: float
    scheduled_at: float | None
    goes_out: float
    held: bool  # the platform held it past when it was due to go out


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class ReplayClient:
    """Answers bulk-status from the arrival model at the clock's time, and logs each poll."""

    stats = RequestStats([BULK_STATUS])  # what the poller reads of a client

    def __init__(self, config: Config, clock: _Clock) -> None:
        self._config, self._clock = config, clock
        self.sends: dict[str, PlannedSend] = {}
        self.recipients: dict[str, int] = {}
        self.by_status: dict[str, dict[str, array[float]]] = {}
        self.polls: dict[str, list[float]] = {}

    def add(self, send: PlannedSend, arrivals: Sequence[tuple[float, str]]) -> None:
        by_status: dict[str, array[float]] = {}
        for delay, status in arrivals:  # already sorted
            by_status.setdefault(status, array("d")).append(delay)
        self.sends[send.message_id] = send
        self.recipients[send.message_id] = len(arrivals)
        self.by_status[send.message_id] = by_status
        self.polls[send.message_id] = []

    def bulk_status(
        self, message_id: str, aggregator: ReportAggregator, *_: object
    ) -> MessageAggregate:
        now = self._clock()
        self.polls[message_id].append(now)
        goes_out = self.sends[message_id].goes_out
        by_status = self.by_status[message_id]
        arrived = {s: bisect.bisect_right(d, now - goes_out) for s, d in by_status.items()}
        recipients = self.recipients[message_id]
        arrived[WAITING] = recipients - sum(arrived.values())
        status_map = self._config.status_map
        states = dict.fromkeys(State, 0)
        for status, count in arrived.items():
            states[status_map.state_of(status)] += count
        latest = max((d[n - 1] for s, d in by_status.items() if (n := arrived[s])), default=None)
        return MessageAggregate(
            MappingProxyType(states),
            MappingProxyType({s.lower(): c for s, c in arrived.items() if c}),
            recipients * 0.0105,
            0,
            goes_out + latest if latest is not None else None,
        )


@dataclasses.dataclass(frozen=True)
class Run:
    requests_per_message: float
    first_report_p95: float  # held sends, from their release
    p50: float
    p95: float
    finalized_unreported: int
    busiest_minute: int


def week_of_sends(world: World, count: int, recipients: int, seed: int = 1) -> list[PlannedSend]:
    """``count`` commercial sends through the week, made in ``world``, in the order made."""
    # Imported here, not above: this script also runs against current main, which has no
    # calendar nor deferred sends (the plan reaches it as JSON).
    from exporter import calendar  # noqa: PLC0415
    from exporter.simulator.model import SCHEDULE_STEP  # noqa: PLC0415

    rng = random.Random(seed)  # noqa: S311 - replayable, not secret

    def when(start: float, end: float, quiet: bool) -> float:
        while calendar.held(t := rng.uniform(start, end)) != quiet:
            pass
        return t

    quiet, deferred = round(count * QUIET), round(count * DEFERRED)
    plan: list[tuple[float, float | None]] = []
    for i in range(count):
        made = when(WEEK, WEEK + 7 * DAY, quiet=i < quiet)
        scheduled: float | None = None
        if quiet <= i < quiet + deferred:  # made in working hours; half go into quiet hours
            later = when(made + 15 * MINUTE, made + LONGEST_DEFERRAL, quiet=(i - quiet) % 2 == 0)
            scheduled = float(math.ceil(later / SCHEDULE_STEP) * SCHEDULE_STEP)
        plan.append((made, scheduled))
    sends = []
    for n, (made, scheduled) in enumerate(sorted(plan, key=lambda p: p[0])):
        sent = world.send(
            recipients, sent_at=made, message_id=str(n), commercial=True, scheduled_at=scheduled
        )
        start = made if scheduled is None else scheduled
        sends.append(PlannedSend(str(n), made, scheduled, sent.goes_out, sent.goes_out > start))
    return sends


def simulate(
    polling: PollingConfig,
    sends: Sequence[PlannedSend],
    arrivals: Callable[[str], Sequence[tuple[float, str]]],
    register: Callable[[PlannedSend], MessageSpec],
    until: float = math.inf,
) -> Run:
    """Follow ``sends`` until every one is final (or ``until``); ``register`` gives the
    exporter a send as the sending application would."""
    clock = _Clock()
    clock.now = sends[0].sent_at
    config = Config(file="bench", api=ApiConfig(max_requests_per_minute=BUDGET), polling=polling)
    client = ReplayClient(config, clock)
    source, poller = inline_source(config, client, clock)
    pending = iter(sends)
    upcoming = next(pending, None)
    while True:
        while upcoming is not None and upcoming.sent_at <= clock.now:
            client.add(upcoming, arrivals(upcoming.message_id))
            source.add(register(upcoming))
            upcoming = next(pending, None)
        wait = poller.run_pending()
        due = source.next_due()
        if (due is None and upcoming is None) or clock.now >= until:
            break
        if due is None or due > clock.now:  # nothing due: skip to the next event
            wait = (math.inf if due is None else due) - clock.now
        if upcoming is not None:
            wait = min(wait, upcoming.sent_at - clock.now)
        clock.now += max(wait, 0.001)
    return _measure(client)


def _measure(client: ReplayClient) -> Run:
    delays: list[float] = []
    first_reports: list[float] = []
    every_poll: list[float] = []
    unreported = 0
    for message_id, polls in client.polls.items():
        send = client.sends[message_id]
        every_poll += polls
        by_status = client.by_status[message_id].values()
        first = min((d[0] for d in by_status if d), default=math.inf)
        seen = bisect.bisect_left(polls, send.goes_out + first)
        unreported += seen == len(polls)  # final before it counted a thing
        if send.held:
            first_reports.append(polls[seen] - send.goes_out if seen < len(polls) else math.inf)
        for arrivals in by_status:
            for delay in arrivals[: bisect.bisect_left(arrivals, HOUR)]:
                arrived = send.goes_out + delay
                later = bisect.bisect_left(polls, arrived)
                delays.append((polls[later] if later < len(polls) else math.inf) - arrived)
    delays.sort()
    first_reports.sort()
    every_poll.sort()
    busiest = max(bisect.bisect_left(every_poll, t + MINUTE) - i for i, t in enumerate(every_poll))
    return Run(
        len(every_poll) / len(client.polls),
        _percentile(first_reports, 0.95),
        _percentile(delays, 0.5),
        _percentile(delays, 0.95),
        unreported,
        busiest,
    )


def _percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[int(len(ordered) * q)] if ordered else math.nan


def _as_sent_now(send: PlannedSend) -> MessageSpec:
    return MessageSpec(send.message_id, sent_at=send.sent_at, scheduled_at=send.scheduled_at)


def _as_sent_before(send: PlannedSend) -> MessageSpec:
    return MessageSpec(send.message_id, sent_at=send.sent_at)  # nothing else to say then


def opening_capacity(polling: PollingConfig, tries: Sequence[int]) -> int:
    """The most held sends (200 recipients) released at one opening, Monday 08:00 after a
    weekend, whose first reports the exporter still counts within the target (p95)."""
    capacity = 0
    for count in tries:
        world = World(seed=1)
        saturday = WEEK + 5 * DAY + 10 * HOUR
        sends = []
        for n in range(count):
            sent = world.send(200, sent_at=saturday + n, message_id=str(n), commercial=True)
            sends.append(PlannedSend(str(n), sent.sent_at, None, sent.goes_out, held=True))
        # The opening's hour is what the figures need: the rest of the week costs time.
        opening = sends[0].goes_out
        trial = simulate(polling, sends, _draws(world), _as_sent_now, until=opening + HOUR)
        if trial.first_report_p95 > TARGETS["first_report_p95"] or trial.busiest_minute > BUDGET:
            break
        capacity = count
    return capacity


def _draws(world: World) -> Callable[[str], Sequence[tuple[float, str]]]:
    def arrivals(message_id: str) -> Sequence[tuple[float, str]]:
        drawn = world.arrivals(message_id)
        world.forget_draws(message_id)  # only the client's copy is kept
        return drawn

    return arrivals


def start_current_main(
    sends: Sequence[PlannedSend], recipients: int, tree: Path
) -> subprocess.Popen[str] | str:
    """Start the same week in ``tree`` under the exporter's code at ``CURRENT_MAIN`` (its files
    from git, this script copied in), or say why it cannot run."""
    repo = Path(__file__).resolve().parent.parent
    files = ["exporter", "benchmarks", "config.yaml"]
    command = ["git", "-C", str(repo), "archive", CURRENT_MAIN, *files]
    try:
        archive = subprocess.run(command, capture_output=True, check=False)  # noqa: S603 - git
    except OSError as e:  # no git here
        return str(e)
    if archive.returncode != 0:
        return archive.stderr.decode(errors="replace").strip() or "git archive failed"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    shutil.copy(__file__, tree / "benchmarks" / "bench_freshness.py")
    (tree / "week.json").write_text(json.dumps([dataclasses.asdict(s) for s in sends]))
    return subprocess.Popen(  # noqa: S603 - this interpreter, this script
        [sys.executable, "-m", "benchmarks.bench_freshness", "--replay", str(recipients)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        stdout=subprocess.PIPE,
        text=True,
    )


def finish_current_main(child: subprocess.Popen[str] | str) -> Run | str:
    """The child's Run, or why there is none."""
    if isinstance(child, str):
        return child
    out, _ = child.communicate()
    if child.returncode != 0:
        return f"failed, exit code {child.returncode}"
    return Run(**json.loads(out))


def replay(recipients: int) -> int:
    """The week in ``week.json`` under whatever exporter is on the path, with the shipped
    defaults of its ``config.yaml``; the Run as JSON on stdout. How current main is measured."""
    sends = [PlannedSend(**s) for s in json.loads(Path("week.json").read_text())]
    world = World(seed=1)
    for send in sends:
        world.send(recipients, sent_at=send.sent_at, message_id=send.message_id)
    polling = load_config("config.yaml", available(), environ={}).polling
    run = simulate(polling, sends, _draws(world), _as_sent_before)
    print(json.dumps(dataclasses.asdict(run)))
    return 0


class Runs(NamedTuple):
    """The same week under each policy; ``before`` is why current main did not run, if not."""

    ours: Run
    naive: Run
    before: Run | str

    def result(self, name: str, field: str, unit: str = "") -> Result:
        value = getattr(self.ours, field)
        target = TARGETS[field]
        return Result(name, value, unit, target, value <= target, self.baselines(field, unit))

    def baselines(self, field: str, unit: str = "") -> str:
        before = self.before
        old = _show(getattr(before, field), unit) if isinstance(before, Run) else before
        return f"naive {_show(getattr(self.naive, field), unit)}, current main {old}"


def _show(value: float, unit: str) -> str:
    if math.isinf(value):
        return "never"
    return f"{value:,.0f} {unit}" if unit else f"{value:,.0f}"


def describe(sends: Sequence[PlannedSend]) -> str:
    deferred = [s for s in sends if s.scheduled_at is not None]
    return (
        f"{len(sends)} campaigns, Mon 11 to Sun 17 May 2026 (Thu 14 is Ascension): "
        f"{sum(s.scheduled_at is None and not s.held for s in sends)} in working hours, "
        f"{sum(s.scheduled_at is None and s.held for s in sends)} in quiet hours, "
        f"{len(deferred)} deferred ({sum(s.held for s in deferred)} into quiet hours); "
        f"{sum(s.held for s in sends)} held by the platform"
    )


def run(quick: bool = False) -> list[Result]:
    recipients = 200 if quick else RECIPIENTS
    count = WEEK_OF_SENDS // 10 if quick else WEEK_OF_SENDS
    world = World(seed=1)
    sends = week_of_sends(world, count, recipients)
    print(f"{describe(sends)}, {recipients:,} recipients each")
    with tempfile.TemporaryDirectory(prefix="freshness-current-main-") as tree:
        child = start_current_main(sends, recipients, Path(tree))  # runs alongside ours
        polling = load_config("config.yaml", available(), environ={}).polling
        draws = {s.message_id: world.arrivals(s.message_id) for s in sends}
        ours = simulate(polling, sends, draws.__getitem__, _as_sent_now)
        naive = simulate(naive_polling(), sends, draws.__getitem__, _as_sent_now)
        runs = Runs(ours, naive, finish_current_main(child))
    opening = opening_capacity(polling, (1000,) if quick else (500, 1000, 1100))
    return [
        runs.result("first report of held sends, p95", "first_report_p95", "s"),
        runs.result("freshness p50 (< 1 h after going out)", "p50", "s"),
        runs.result("freshness p95 (< 1 h after going out)", "p95", "s"),
        runs.result("requests per message", "requests_per_message"),
        runs.result("final before a report was counted", "finalized_unreported"),
        Result(
            "most requests in 60 s",
            ours.busiest_minute,
            "",
            BUDGET,
            ours.busiest_minute <= BUDGET and naive.busiest_minute <= BUDGET,
            runs.baselines("busiest_minute"),
        ),
        Result(
            "held sends one opening releases in time",
            opening,
            "",
            TARGETS["opening"],
            opening >= TARGETS["opening"],
            f"the most tried whose first reports meet the p95 target at {BUDGET} requests/min",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sends of 200 recipients")
    parser.add_argument("--replay", type=int, metavar="RECIPIENTS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay is not None:
        return replay(args.replay)
    results = run(args.quick)
    print_results(f"Freshness per request (a week of campaigns, {BUDGET} requests/min)", results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
