"""A believable account to look at: campaigns of every age, a new one every few minutes, and a
transactional stream of one-recipient sends every few seconds.

Mail Partner takes at most 500 recipients per send, and each send is one message ID: a bigger
campaign is several sends under the same campaign label, made together.
"""

from __future__ import annotations

import math
import random
from collections import deque

from exporter.simulator.model import MAX_DELAY, SimulatedSend, World

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
# How far back start() reaches into the stream, so a fresh demo shows one at once. No
# further: every send is polled once at startup (at 10 requests a second by default), and
# the exporter's --demo promises its configured messages' series within 5 seconds.
STREAM_HISTORY = 60.0
# A send's last poll is due 48 hours after it was made; an hour more covers a late one.
KEEP = MAX_DELAY + 3600.0


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
        # The sends this object may forget, oldest first; the built-in ones are kept for good,
        # because deploy/docker/config.yaml names them.
        self._forgettable: deque[SimulatedSend] = deque()

    def start(self) -> list[SimulatedSend]:
        """The built-in campaigns and the stream's last ``STREAM_HISTORY`` seconds, dated in
        the past relative to the world's clock; IDs in the order the sends were made."""
        now = self._world.clock()
        first = [
            self._world.send(split(recipients)[0], sent_at=now - age, campaign=campaign)
            for age, recipients, campaign in _BUILT_IN
        ]
        more = [
            self._world.send(part, sent_at=now - age, campaign=campaign)
            for age, recipients, campaign in _BUILT_IN
            for part in split(recipients)[1:]
        ]
        history = []
        if self._stream_interval is not None:
            slots = max(1, math.floor(STREAM_HISTORY / self._stream_interval))
            history = [
                self._transactional(self._origin - k * self._stream_interval)
                for k in range(slots - 1, -1, -1)
            ]
        self._forgettable.extend(sorted(more + history, key=lambda s: s.sent_at))
        return first + more + history

    def due(self) -> list[SimulatedSend]:
        """The sends scheduled since the last call, each dated at its own slot, in time order
        (a campaign's before a stream send dated the same).

        Sends this object made more than ``KEEP`` ago are forgotten by the world, so a long
        demo holds two days of sends rather than every send since it started.
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
        self._forgettable.extend(sends)
        self._forget(now - KEEP)
        return sends

    def _campaign(self, at: float) -> list[SimulatedSend]:
        recipients = self._rng.randint(*_CAMPAIGN_RECIPIENTS)
        campaign = self._rng.choice(_CAMPAIGNS)
        return [self._world.send(part, sent_at=at, campaign=campaign) for part in split(recipients)]

    def _transactional(self, at: float) -> SimulatedSend:
        return self._world.send(1, sent_at=at, campaign=self._stream_rng.choice(TRANSACTIONAL))

    def _forget(self, before: float) -> None:
        while self._forgettable and self._forgettable[0].sent_at < before:
            self._world.forget(self._forgettable.popleft().message_id)
