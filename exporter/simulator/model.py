"""The simulated Mail Partner account: sends and how their recipient reports evolve.  An SMS
Partner account is a World too, read in that API's words by ``sms.py``.

Every recipient's fate is drawn once per message (``fates.py``), so the same seed always
replays the same world; what a poll sees at a given time is a cheap pass over those arrays.

A send goes out when it is made, unless Mail Partner's sending rules say later: a deferred send
(``scheduled_at``) at its scheduled time, and a commercial one made in quiet hours at the next
opening of the sending calendar (``exporter.calendar``), the two combined for a commercial
deferred send.  Until then every recipient reads ``Waiting``, dated when the send was made;
from then on the recipients progress as those of a send made at that moment would, with their
arrival delays counted from it.  A deferred send can be cancelled up to ``CANCEL_NOTICE``
seconds before it goes out, and is then unknown, as if never made.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from exporter import calendar
from exporter.simulator.fates import MAX_DELAY, OUTCOMES, Fates, draw_fates

Clock = Callable[[], float]

WAITING = "Waiting"
# scheduledDeliveryDate takes an hour and a minute in 5-minute steps.
SCHEDULE_STEP = 300
# How long before it goes out a deferred send can still be cancelled.
CANCEL_NOTICE = 300.0


@dataclass(frozen=True)
class SimulatedSend:
    message_id: str
    sent_at: float
    recipients: int
    cost_per_recipient: float
    campaign: str
    # Held through quiet hours by the sending calendar: a commercial send on an account whose
    # restriction is in force (never a transactional one, nor any send of a lifted account).
    commercial: bool = False
    # scheduledDeliveryDate: nothing goes out before; None for a send that goes out at once.
    scheduled_at: float | None = None

    @property
    def goes_out(self) -> float:
        """When the first recipient can be delivered; reports arrive from here on."""
        start = self.sent_at if self.scheduled_at is None else self.scheduled_at
        return calendar.release(start) if self.commercial else start


class CannotCancel(Exception):
    """message-cancel refuses this send; each subclass is one reason (and one API code)."""


class AlreadyCancelled(CannotCancel):
    pass


class TooLateToCancel(CannotCancel):
    """The deferred send goes out within ``CANCEL_NOTICE`` seconds."""


class NotCancellable(CannotCancel):
    """The send was not deferred, or has gone out already."""


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


class World:
    """All sends of the simulated account; thread-safe.

    ``holds_commercial`` False is an account whose restriction is lifted: its commercial sends
    go out at once, as transactional ones do.
    """

    def __init__(
        self,
        seed: int = 1,
        clock: Clock = time.time,
        *,
        cost_per_recipient: float = 0.0105,
        holds_commercial: bool = True,
    ) -> None:
        self.seed = seed
        self.clock = clock
        # What a send costs per recipient unless it says otherwise: this account's price.
        self.cost_per_recipient = cost_per_recipient
        self.holds_commercial = holds_commercial
        self._lock = threading.Lock()
        self._sends: dict[str, SimulatedSend] = {}
        self._fates: dict[str, Fates] = {}
        # Cancelled sends, which keep their IDs: message-cancel tells them from unknown ones.
        self._cancelled: dict[str, SimulatedSend] = {}
        self._next_id = itertools.count(1000)

    def send(
        self,
        recipients: int,
        *,
        sent_at: float | None = None,
        message_id: str | None = None,
        campaign: str = "demo",
        cost_per_recipient: float | None = None,
        commercial: bool = False,
        scheduled_at: float | None = None,
    ) -> SimulatedSend:
        """A send made at ``sent_at`` (now by default): transactional unless ``commercial``
        (then held through quiet hours), deferred to ``scheduled_at`` if given (a multiple of
        ``SCHEDULE_STEP`` seconds, not before ``sent_at``)."""
        if recipients < 0:
            raise ValueError(f"recipients must be >= 0, got {recipients}")
        when = self.clock() if sent_at is None else sent_at
        if scheduled_at is not None:
            _check_schedule(scheduled_at, when)
        if cost_per_recipient is None:
            cost_per_recipient = self.cost_per_recipient
        with self._lock:
            if message_id is None:
                message_id = next(i for i in map(str, self._next_id) if not self._taken(i))
            elif self._taken(message_id):
                raise ValueError(f"message {message_id!r} already exists")
            sent = SimulatedSend(
                message_id,
                when,
                recipients,
                cost_per_recipient,
                campaign,
                commercial=commercial and self.holds_commercial,
                scheduled_at=scheduled_at,
            )
            self._sends[message_id] = sent
        return sent

    def cancel(self, message_id: str, at: float | None = None) -> SimulatedSend:
        """Cancel a deferred send, as ``GET /v1/message-cancel`` does: from then on it is
        unknown. KeyError for an unknown message; a ``CannotCancel`` subclass for a send
        that cannot be cancelled (any more)."""
        now = self.clock() if at is None else at
        with self._lock:
            if message_id in self._cancelled:
                raise AlreadyCancelled(message_id)
            sent = self._sends[message_id]
            goes_out = sent.goes_out
            if sent.scheduled_at is None or now >= goes_out:
                raise NotCancellable(message_id)
            if now > goes_out - CANCEL_NOTICE:
                raise TooLateToCancel(message_id)
            del self._sends[message_id]
            self._fates.pop(message_id, None)
            self._cancelled[message_id] = sent
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
        now = self.clock() if at is None else at
        goes_out = sent.goes_out
        elapsed = now - goes_out
        waiting_date = _waiting_date(sent, goes_out, now)
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
                int(goes_out + delay) if arrived else waiting_date,
            )

    def waiting(self, at: float | None = None) -> int:
        """How many recipients, over every send, still read ``Waiting`` at ``at``."""
        now = self.clock() if at is None else at
        total = 0
        for sent in self.sends():
            elapsed = now - sent.goes_out
            if elapsed >= MAX_DELAY:
                continue  # every report is in; no need to draw (or keep) its fates
            if elapsed < 0:
                total += sent.recipients  # not gone out yet: no need to draw either
                continue
            _, fates = self._lookup(sent.message_id)
            total += sum(1 for delay in fates.delays if delay > elapsed)
        return total

    def truth(self, message_id: str, at: float | None = None) -> Truth:
        """What a correct consumer must compute from ``reports(message_id, at)``."""
        sent, fates = self._lookup(message_id)
        now = self.clock() if at is None else at
        goes_out = sent.goes_out
        elapsed = now - goes_out
        waiting_date = _waiting_date(sent, goes_out, now)
        statuses: Counter[str] = Counter()
        last_date: int | None = None
        for delay, outcome in zip(fates.delays, fates.outcomes, strict=True):
            arrived = delay <= elapsed
            statuses[OUTCOMES[outcome] if arrived else WAITING] += 1
            date = int(goes_out + delay) if arrived else waiting_date
            last_date = date if last_date is None else max(last_date, date)
        return Truth(
            statuses=dict(statuses),
            # Summed one by one, as a consumer adding up the reports would.
            cost=sum(itertools.repeat(sent.cost_per_recipient, sent.recipients), 0.0),
            unsubscribed=sum(fates.stop_mail),
            last_date=last_date,
        )

    def arrivals(self, message_id: str) -> list[tuple[float, str]]:
        """Each recipient's report as (seconds after the send goes out, final status),
        soonest first: the arrival model, for benchmarks that replay it without HTTP."""
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
            self._cancelled.pop(message_id, None)

    def _taken(self, message_id: str) -> bool:
        return message_id in self._sends or message_id in self._cancelled

    def _lookup(self, message_id: str) -> tuple[SimulatedSend, Fates]:
        with self._lock:
            sent = self._sends[message_id]
            fates = self._fates.get(message_id)
            if fates is None:
                fates = draw_fates(self.seed, message_id, sent.recipients)
                self._fates[message_id] = fates
        return sent, fates


def _check_schedule(scheduled_at: float, sent_at: float) -> None:
    if not math.isfinite(scheduled_at) or scheduled_at % SCHEDULE_STEP:
        raise ValueError(
            f"scheduled_at must fall on a {SCHEDULE_STEP // 60}-minute step"
            f" (a multiple of {SCHEDULE_STEP} s), got {scheduled_at}"
        )
    if scheduled_at < sent_at:
        raise ValueError(f"scheduled_at {scheduled_at} is before the send, at {sent_at}")


def _waiting_date(sent: SimulatedSend, goes_out: float, now: float) -> int:
    """A ``Waiting`` report's date: when the send was made, then when it went out (as for a
    send made then), so that no report is dated in the future nor before the send goes out
    once it has."""
    return int(goes_out) if now >= goes_out else int(sent.sent_at)
