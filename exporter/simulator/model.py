"""The simulated Mail Partner account: sends and how their recipient reports evolve.  An SMS
Partner account is a World too, read in that API's words by ``sms.py``.

Every recipient's fate (arrival delay, outcome, unsubscribe flag, token) is drawn once per
message from ``random.Random(f"{seed}:{message_id}")``, so the same seed always replays the
same world; what a poll sees at a given time is a cheap pass over those precomputed arrays.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

Clock = Callable[[], float]

WAITING = "Waiting"
# Indexes into this tuple are what a recipient's outcome byte stores.  The rare tail exists so
# that consumers meet both statuses they map (Bounced, ko) and one nobody maps (Deferred).
OUTCOMES = ("Delivered", "Not delivered", "Bounced", "ko", "Deferred")
MAX_DELAY = 48 * 3600.0


@dataclass(frozen=True)
class SimulatedSend:
    message_id: str
    sent_at: float
    recipients: int
    cost_per_recipient: float
    campaign: str


@dataclass(frozen=True)
class RecipientReport:
    email: str
    token: str
    status: str
    cost: float
    stop_mail: bool
    date: int


@dataclass(frozen=True)
class Truth:
    statuses: Mapping[str, int]
    cost: float
    unsubscribed: int
    last_date: int | None


@dataclass(frozen=True)
class _Fates:
    """Per-recipient draws of one message, as compact arrays (a 1M-recipient send is ~10 MB)."""

    delays: array[float]
    outcomes: bytes
    stop_mail: bytes
    tokens: bytes  # 8 random bytes per recipient, hex-encoded on demand


def _draw_delay(rng: random.Random) -> float:
    band = rng.random()
    if band < 0.80:
        delay = rng.expovariate(1 / 5.0)
    elif band < 0.95:
        delay = rng.expovariate(1 / 600.0)
    else:
        delay = math.exp(rng.uniform(math.log(3600.0), math.log(MAX_DELAY)))
    return min(delay, MAX_DELAY)


def _draw_outcome(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.93:
        return 0
    if roll < 0.99:
        return 1
    return rng.randrange(2, len(OUTCOMES))


def _draw_fates(seed: int, message_id: str, recipients: int) -> _Fates:
    # Draws run in recipient order, so recipient i's fate does not depend on the send's size.
    rng = random.Random(f"{seed}:{message_id}")  # noqa: S311 - replayable, not secret
    token_rng = random.Random(f"{seed}:{message_id}:tokens")  # noqa: S311 - same reason
    delays = array("d", bytes(8 * recipients))
    outcomes = bytearray(recipients)
    stop_mail = bytearray(recipients)
    for i in range(recipients):
        delays[i] = _draw_delay(rng)
        outcomes[i] = _draw_outcome(rng)
        stop_mail[i] = rng.random() < 0.015
    return _Fates(delays, bytes(outcomes), bytes(stop_mail), token_rng.randbytes(8 * recipients))


class World:
    """All sends of the simulated account; thread-safe."""

    def __init__(
        self, seed: int = 1, clock: Clock = time.time, *, cost_per_recipient: float = 0.0105
    ) -> None:
        self.seed = seed
        self.clock = clock
        # What a send costs per recipient unless it says otherwise: this account's price.
        self.cost_per_recipient = cost_per_recipient
        self._lock = threading.Lock()
        self._sends: dict[str, SimulatedSend] = {}
        self._fates: dict[str, _Fates] = {}
        self._next_id = itertools.count(1000)

    def send(
        self,
        recipients: int,
        *,
        sent_at: float | None = None,
        message_id: str | None = None,
        campaign: str = "demo",
        cost_per_recipient: float | None = None,
    ) -> SimulatedSend:
        if recipients < 0:
            raise ValueError(f"recipients must be >= 0, got {recipients}")
        when = self.clock() if sent_at is None else sent_at
        if cost_per_recipient is None:
            cost_per_recipient = self.cost_per_recipient
        with self._lock:
            if message_id is None:
                message_id = next(i for i in map(str, self._next_id) if i not in self._sends)
            elif message_id in self._sends:
                raise ValueError(f"message {message_id!r} already exists")
            sent = SimulatedSend(message_id, when, recipients, cost_per_recipient, campaign)
            self._sends[message_id] = sent
        return sent

    def get(self, message_id: str) -> SimulatedSend | None:
        with self._lock:
            return self._sends.get(message_id)

    def sends(self) -> list[SimulatedSend]:
        with self._lock:
            return list(self._sends.values())

    def reports(self, message_id: str, at: float | None = None) -> Iterator[RecipientReport]:
        """The reports a bulk-status poll at ``at`` returns; KeyError for an unknown message."""
        sent, fates = self._lookup(message_id)
        elapsed = (self.clock() if at is None else at) - sent.sent_at
        sent_date = int(sent.sent_at)
        cost = sent.cost_per_recipient
        tokens = fates.tokens
        for i, (delay, outcome, stop_mail) in enumerate(
            zip(fates.delays, fates.outcomes, fates.stop_mail, strict=True)
        ):
            arrived = delay <= elapsed
            yield RecipientReport(
                f"r{i}@example.com",
                tokens[8 * i : 8 * i + 8].hex(),
                OUTCOMES[outcome] if arrived else WAITING,
                cost,
                stop_mail == 1,
                int(sent.sent_at + delay) if arrived else sent_date,
            )

    def waiting(self, at: float | None = None) -> int:
        """How many recipients, over every send, still read ``Waiting`` at ``at``."""
        now = self.clock() if at is None else at
        total = 0
        for sent in self.sends():
            elapsed = now - sent.sent_at
            if elapsed >= MAX_DELAY:
                continue  # every report is in; no need to draw (or keep) its fates
            _, fates = self._lookup(sent.message_id)
            total += sum(1 for delay in fates.delays if delay > elapsed)
        return total

    def truth(self, message_id: str, at: float | None = None) -> Truth:
        """What a correct consumer must compute from ``reports(message_id, at)``."""
        sent, fates = self._lookup(message_id)
        elapsed = (self.clock() if at is None else at) - sent.sent_at
        statuses: Counter[str] = Counter()
        last_date: int | None = None
        for delay, outcome in zip(fates.delays, fates.outcomes, strict=True):
            arrived = delay <= elapsed
            statuses[OUTCOMES[outcome] if arrived else WAITING] += 1
            date = int(sent.sent_at + delay) if arrived else int(sent.sent_at)
            last_date = date if last_date is None else max(last_date, date)
        return Truth(
            statuses=dict(statuses),
            # Summed one by one, as a consumer adding up the reports would.
            cost=sum(itertools.repeat(sent.cost_per_recipient, sent.recipients), 0.0),
            unsubscribed=sum(fates.stop_mail),
            last_date=last_date,
        )

    def arrivals(self, message_id: str) -> list[tuple[float, str]]:
        """Each recipient's report as (seconds after sending, final status), soonest first:
        the arrival model, for benchmarks that replay it without HTTP."""
        _, fates = self._lookup(message_id)
        return sorted(
            (delay, OUTCOMES[outcome])
            for delay, outcome in zip(fates.delays, fates.outcomes, strict=True)
        )

    def forget_draws(self, message_id: str) -> None:
        """Drop a message's cached draws (they come back identical if asked again), so a long
        benchmark holds only the messages it still needs."""
        with self._lock:
            self._fates.pop(message_id, None)

    def forget(self, message_id: str) -> None:
        """Drop a send and its draws, as if it had never been made: ``get`` no longer finds it
        and ``sends`` no longer lists it. A world that keeps sending (the demo's stream, one
        every few seconds) stays the same size by forgetting sends nobody polls any more."""
        with self._lock:
            self._sends.pop(message_id, None)
            self._fates.pop(message_id, None)

    def _lookup(self, message_id: str) -> tuple[SimulatedSend, _Fates]:
        with self._lock:
            sent = self._sends[message_id]
            fates = self._fates.get(message_id)
            if fates is None:
                fates = _draw_fates(self.seed, message_id, sent.recipients)
                self._fates[message_id] = fates
        return sent, fates
