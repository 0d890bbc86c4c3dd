"""A believable account to look at: campaigns of every age, a new one every few minutes, and a
transactional stream of one-recipient sends every few seconds.

Mail Partner takes at most 500 recipients per send, and each send is one message ID: a bigger
campaign is several sends under the same campaign label, made together.  Campaigns are
commercial, so the platform holds those made in quiet hours until the next opening (on the
world's clock); the transactional stream is never held.  Two more sends show the sending
rules at once: one made in the latest quiet period (held still if the demo starts in quiet
hours, released at the last opening otherwise) and one deferred to a quarter of an hour on.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import math
import random

from exporter.calendar import PARIS, release
from exporter.simulator.fates import MAX_DELAY
from exporter.simulator.model import SCHEDULE_STEP, SimulatedSend, World

MAX_RECIPIENTS = 500  # per send, as Mail Partner accepts them

# (age in seconds, recipients, campaign): one send in each phase a message goes through,
# from "reports still arriving" to "an hour short of final"; password-reset and invoice are
# one-recipient sends, like the stream's. Their first sends get the IDs 1000 to 1005 in this
# order, which deploy/docker/config.yaml lists with these campaigns.
_BUILT_IN = (
    (20, 120, "welcome"),
    (8 * 60, 1, "password-reset"),
    (45 * 60, 1500, "newsletter"),
    (3 * 3600, 1000, "promo"),
    (20 * 3600, 1, "invoice"),
    (47 * 3600, 800, "reactivation"),
)
# What a new campaign is about, and how many recipients it has in all.
_CAMPAIGNS = ("welcome", "newsletter", "promo", "reactivation")
_CAMPAIGN_RECIPIENTS = (50, 2000)
TRANSACTIONAL = ("password-reset", "invoice")
# The sends start() makes after the built-in ones, with the next IDs: a campaign made in the
# latest quiet period, one deferred to the first 5-minute step this far after the start, and
# one deferred into the next quiet period (held when it goes out, whatever the hour now).
AFTER_HOURS = (400, "after-hours-promo")
DEFERRED = (250, "deferred-promo")
OVERNIGHT = (300, "overnight-promo")
DEFER_BY = 15 * 60.0
# How far back start() reaches into the stream, so a fresh demo shows one at once. No
# further: every send is polled once at startup (at 10 requests a second by default), and
# the exporter's --demo promises its configured messages' series within 5 seconds.
STREAM_HISTORY = 60.0
# A send's last poll is due 48 hours after it went out; an hour more covers a late one.
KEEP = MAX_DELAY + 3600.0


def quiet_time_before(now: float) -> float:
    """When the demo's after-hours campaign was made: half an hour (or a minute) ago if that
    was in the quiet period ``now`` is in, so that it is held still; else the latest 21:30
    Europe/Paris (always quiet hours, released at an opening since)."""
    for age in (1800.0, 60.0):
        if release(now - age) == release(now) > now:
            return now - age
    local = dt.datetime.fromtimestamp(now, PARIS)
    evening = local.replace(hour=21, minute=30, second=0, microsecond=0)
    if evening.timestamp() > now:
        evening = dt.datetime.combine(local.date() - dt.timedelta(days=1), evening.time(), PARIS)
    return evening.timestamp()


def quiet_time_after(when: float) -> float:
    """The first 5-minute step from ``when`` on that falls in quiet hours: ``when`` itself if
    it does, else 20:30 Europe/Paris that day (a working day's closing is 20:00)."""
    if release(when) > when:
        return when
    local = dt.datetime.fromtimestamp(when, PARIS)
    return local.replace(hour=20, minute=30, second=0, microsecond=0).timestamp()


def split(recipients: int) -> list[int]:
    """One campaign's recipients as the sends Mail Partner takes: full ones, then the rest."""
    full, rest = divmod(recipients, MAX_RECIPIENTS)
    return [MAX_RECIPIENTS] * full + ([rest] if rest else [])


class DemoCampaign:
    """Makes the demo's sends in a world: ``start()`` the past ones, then ``due()`` the new.

    The campaign draws and the stream's draws come from two generators seeded from the world,
    and ``due()`` makes sends in time order whenever it is called, so a world replays the
    same sends with the same IDs.
    """

    def __init__(
        self,
        world: World,
        *,
        interval: float = 180.0,
        transactional_interval: float | None = 5.0,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        if transactional_interval is not None and transactional_interval < 0:
            raise ValueError(
                f"transactional_interval must be >= 0 (0: off), got {transactional_interval}"
            )
        self._world = world
        self._interval = interval
        self._stream_interval = transactional_interval or None
        self._rng = random.Random(f"{world.seed}:demo")  # noqa: S311 - replayable, not secret
        self._stream_rng = random.Random(f"{world.seed}:demo:stream")  # noqa: S311 - same
        # Slots count from here, so each send's date does not depend on when due() runs.
        self._origin = world.clock()
        self._campaigns_made = 0
        self._stream_made = 0
        # The sends this object may forget, as a heap by when they go out (a held send outlives
        # later ones); the built-in ones are kept for good: deploy/docker/config.yaml names them.
        self._forgettable: list[tuple[float, int, str]] = []
        self._made = itertools.count()

    def start(self) -> list[SimulatedSend]:
        """The built-in campaigns, the after-hours and the deferred campaign, and the stream's
        last ``STREAM_HISTORY`` seconds, dated in the past relative to the world's clock; IDs
        in that order (1000 to 1005 the built-in campaigns' first sends)."""
        now = self._world.clock()
        first = [
            self._send(split(recipients)[0], now - age, campaign)
            for age, recipients, campaign in _BUILT_IN
        ]
        more = [
            self._send(part, now - age, campaign)
            for age, recipients, campaign in _BUILT_IN
            for part in split(recipients)[1:]
        ]
        shown = self._sending_rules(now)
        history = []
        if self._stream_interval is not None:
            slots = max(1, math.floor(STREAM_HISTORY / self._stream_interval))
            history = [
                self._transactional(self._origin - k * self._stream_interval)
                for k in range(slots - 1, -1, -1)
            ]
        self._keep_until_done(more + shown + history)
        return first + more + shown + history

    def due(self) -> list[SimulatedSend]:
        """The sends scheduled since the last call, each dated at its own slot, in time order
        (a campaign's before a stream send dated the same).

        Sends this object made that went out more than ``KEEP`` ago are forgotten by the world,
        so a long demo holds two days of sends (and the weekend's held ones) rather than every
        send since it started.
        """
        now = self._world.clock()
        sends: list[SimulatedSend] = []
        while True:
            campaign_at = self._origin + (self._campaigns_made + 1) * self._interval
            stream_at = (
                math.inf
                if self._stream_interval is None
                else self._origin + (self._stream_made + 1) * self._stream_interval
            )
            if min(campaign_at, stream_at) > now:
                break
            if campaign_at <= stream_at:
                sends += self._campaign(campaign_at)
                self._campaigns_made += 1
            else:
                sends.append(self._transactional(stream_at))
                self._stream_made += 1
        self._keep_until_done(sends)
        self._forget(now - KEEP)
        return sends

    def _sending_rules(self, now: float) -> list[SimulatedSend]:
        """The after-hours campaign, and the two deferred ones, made now."""
        recipients, campaign = AFTER_HOURS
        after_hours = self._send(recipients, quiet_time_before(now), campaign)
        recipients, campaign = DEFERRED
        scheduled_at = math.ceil((now + DEFER_BY) / SCHEDULE_STEP) * SCHEDULE_STEP
        deferred = self._world.send(
            recipients, sent_at=now, campaign=campaign, commercial=True, scheduled_at=scheduled_at
        )
        recipients, campaign = OVERNIGHT
        overnight = self._world.send(
            recipients,
            sent_at=now,
            campaign=campaign,
            commercial=True,
            scheduled_at=quiet_time_after(scheduled_at),
        )
        return [after_hours, deferred, overnight]

    def _send(self, recipients: int, at: float, campaign: str) -> SimulatedSend:
        """A send of the demo's campaign ``campaign``: commercial unless it is transactional."""
        commercial = campaign not in TRANSACTIONAL
        return self._world.send(recipients, sent_at=at, campaign=campaign, commercial=commercial)

    def _campaign(self, at: float) -> list[SimulatedSend]:
        recipients = self._rng.randint(*_CAMPAIGN_RECIPIENTS)
        campaign = self._rng.choice(_CAMPAIGNS)
        return [self._send(part, at, campaign) for part in split(recipients)]

    def _transactional(self, at: float) -> SimulatedSend:
        return self._send(1, at, self._stream_rng.choice(TRANSACTIONAL))

    def _keep_until_done(self, sends: list[SimulatedSend]) -> None:
        for sent in sends:
            heapq.heappush(self._forgettable, (sent.goes_out, next(self._made), sent.message_id))

    def _forget(self, before: float) -> None:
        """Forget the sends that went out before ``before``."""
        while self._forgettable and self._forgettable[0][0] < before:
            self._world.forget(heapq.heappop(self._forgettable)[2])
