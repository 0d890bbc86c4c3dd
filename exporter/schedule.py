"""When a message is polled next, and when it is done: the tracker's policy, as pure functions.

A message's life counts from its first report, not from its send: a newsletter held over the
weekend, or deferred to next Tuesday, has nothing to report until it goes out, and the
schedule, ``settled_recheck`` and ``final_after`` only start then. Until then it is
*unreported*: polled on the schedule while young, at most ``unreported_every`` apart after
that, at the next opening (08:00 Europe/Paris on a working day, ``exporter.calendar``) while
the platform holds it, and final after ``unreported_max`` with nothing reported.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from exporter import calendar
from exporter.aggregate import MessageAggregate
from exporter.config.model import PollingConfig
from exporter.domain import MessageSpec, State
from exporter.tracked import Phase, TrackedMessage

# First retry of a failed poll; each further failure doubles it, up to the interval.
RETRY_AFTER = 10.0
# A message the API still does not know this long after it went out is not one of the
# account's (a typo, another account's, junk registered by mistake, a cancelled send).
NOT_FOUND_AFTER = 15 * 60.0
# A held message is polled within this long after the opening (spread by the jitter, so that
# a weekend's worth of held sends is not one burst at 08:00:00).
RELEASE_SPREAD = 30.0


class Plan(NamedTuple):
    """What follows a successful poll."""

    phase: Phase
    next_poll: float
    interval: float
    first_report: float | None
    held_until: float | None = None  # unreported, and held by the platform until then
    unreported: bool = False  # final with nothing ever reported


def reported(aggregate: MessageAggregate | None) -> bool:
    """Has anything of the message been reported: a recipient no longer pending?"""
    if aggregate is None:
        return False
    return any(n for state, n in aggregate.states.items() if state != State.PENDING)


def first_report(message: TrackedMessage, aggregate: MessageAggregate, now: float) -> float | None:
    """When the message's life began, given this poll's ``aggregate``.

    Seen to change from unreported to reported, it began now (within one poll's gap). Found
    reported at its first poll (first seen late, or saved before this was kept), it began
    when it went out, as the exporter has always counted.
    """
    if message.first_report is not None:
        return message.first_report
    if not reported(aggregate):
        return None
    if message.last_success is None or reported(message.aggregate):
        return message.start
    return now


def interval(message: TrackedMessage, now: float, polling: PollingConfig) -> float:
    """The schedule's interval for the message's age, from its first report; unreported, from
    its start and at most ``unreported_every``."""
    if message.first_report is None:
        young = polling.interval(max(0.0, now - message.start))
        return min(young, polling.unreported_every)
    return polling.interval(max(0.0, now - message.first_report))


def after_success(
    message: TrackedMessage,
    aggregate: MessageAggregate,
    now: float,
    polling: PollingConfig,
    spread: float = 0.5,
) -> Plan:
    """What follows a successful poll. ``spread`` (0 to 1) places a held message's next poll
    within ``RELEASE_SPREAD`` after the opening."""
    first = first_report(message, aggregate, now)
    if first is None:
        return _unreported(message, now, polling, spread)
    aged = dataclasses.replace(message, first_report=first)
    final_at = first + polling.final_after
    if now >= final_at:
        return Plan(Phase.FINAL, now, 0.0, first)
    if aggregate.pending or not aggregate.recipients:
        every = interval(aged, now, polling)
        return Plan(Phase.ACTIVE, min(now + every, final_at), every, first)
    if message.phase == Phase.SETTLED:  # this was the recheck, and still nothing pending
        return Plan(Phase.FINAL, now, 0.0, first)
    recheck = polling.settled_recheck
    return Plan(Phase.SETTLED, min(now + recheck, final_at), recheck, first)


def _unreported(message: TrackedMessage, now: float, polling: PollingConfig, spread: float) -> Plan:
    give_up = message.start + polling.unreported_max
    if now >= give_up:
        return Plan(Phase.FINAL, now, 0.0, None, unreported=True)
    every = interval(message, now, polling)
    if not polling.transactional(message.spec) and calendar.held(now):
        opening = calendar.release(now)
        next_poll = min(opening + spread * RELEASE_SPREAD, give_up)
        return Plan(Phase.ACTIVE, next_poll, every, None, held_until=opening)
    return Plan(Phase.ACTIVE, min(now + every, give_up), every, None)


class Retry(NamedTuple):
    """What follows a failed poll."""

    next_poll: float
    interval: float
    give_up: bool  # final with the values it has
    not_found: bool  # final because the API never knew it


def first_poll(spec: MessageSpec, now: float) -> float:
    """Now, or when a deferred send goes out: nothing is polled before it."""
    return now if spec.scheduled_at is None else max(now, spec.scheduled_at)


def after_failure(
    message: TrackedMessage, now: float, polling: PollingConfig, jitter: float, not_found: bool
) -> Retry:
    """Retry with exponential backoff and ``jitter``, from ``RETRY_AFTER`` up to the
    schedule's interval for the message's age.

    Past ``final_after`` (or past first sight, for a message first seen later) a failing
    message is retried for ``settled_recheck``, then given up as final with the values it
    has. One the API does not know (``not_found``) backs off further, without the interval's
    cap, and is final as not found ``NOT_FOUND_AFTER`` after it went out: junk costs about
    eight requests, not two days of them.
    """
    final_at = final_after(message, polling)
    interval = retry_interval(message, now, polling)
    backoff = RETRY_AFTER * 2 ** min(message.failures, 16)
    retry = (backoff if not_found else min(interval, backoff)) * jitter
    give_up = now >= max(final_at, message.first_seen) + polling.settled_recheck
    if not_found:
        final_at = min(final_at, message.start + NOT_FOUND_AFTER)
        not_found = now >= final_at
    give_up = give_up or not_found
    next_poll = now + retry if now >= final_at else min(now + retry, final_at)
    return Retry(next_poll, 0.0 if give_up else interval, give_up, not_found)


def final_after(message: TrackedMessage, polling: PollingConfig) -> float:
    """When a message whose polls keep failing gets its last poll: ``final_after`` from its
    first report, or from its start if none came (failing for two days is news either way)."""
    return _origin(message) + polling.final_after


def retry_interval(message: TrackedMessage, now: float, polling: PollingConfig) -> float:
    """The longest wait before retrying a failed poll: the schedule's interval for its age."""
    return polling.interval(max(0.0, now - _origin(message)))


def _origin(message: TrackedMessage) -> float:
    return message.first_report if message.first_report is not None else message.start
