"""The status page's summary cards: is the API answering, is the budget enough, how many
credits are left, how many messages are in each phase, and which are in trouble."""

from __future__ import annotations

import html
import math
import operator
from collections.abc import Mapping, Sequence

from exporter.summary import StatusSummary
from exporter.tracked import TrackedMessage
from exporter.wording import ID_CHARS, clipped, in_words, number, rate, unbroken, when

_SUMMARY_ERROR_CHARS = 80  # the last failed poll's error; the whole in the tooltip


def summary_cards(summary: StatusSummary, messages: Sequence[TrackedMessage], now: float) -> str:
    """Cards: is the API answering, is the budget enough, how many credits are left, how many
    messages are in each phase."""
    cards = [_api(summary, messages, now), _budget(summary)]
    if summary.credits is not None:
        cards.append(_credits(summary.credits, summary.low_credits))
    if summary.phases is not None:
        cards.append(_phases(summary.phases, messages))
    return f'<section class="summary">{"".join(cards)}</section>\n'


def _api(summary: StatusSummary, messages: Sequence[TrackedMessage], now: float) -> str:
    if summary.up is None:
        health, state = "idle", "&ndash; no request yet"
    else:
        health, state = ("good", "&#x2714; up") if summary.up else ("bad", "&#x2716; down")
    errors = " · ".join(f"{html.escape(k)} {n}" for k, n in sorted(summary.errors.items()))
    lines = [
        f'<p class="state"><b>{state}</b> {_named("mailpartner_up")}</p>',
        f"<p>Errors since start: {errors or 'none'}</p>",
        f"<p>429 pauses since start: {summary.rate_limited}</p>",
    ]
    if (failed := _newest_failure(messages)) is not None:
        error = clipped(failed.last_error, _SUMMARY_ERROR_CHARS)
        lines.append(
            f"<p>Last failed poll: {clipped(failed.spec.id, ID_CHARS)}, "
            f"{when(failed.last_poll, now)}: {error}</p>"
        )
    return _card("Mail Partner API", health, lines)


def _budget(summary: StatusSummary) -> str:
    """Requests sent and scheduled, against the budget: how much of it they use."""
    recent, scheduled, allowed = summary.recent, summary.scheduled, summary.budget
    if recent is None:
        sent = "&ndash; (just started)"
    else:
        pace = ", ".join(
            filter(None, [rate(recent.per_minute), _share(recent.per_minute, allowed)])
        )
        window = unbroken(in_words(recent.seconds))
        sent = f"<b>{number(recent.count, 0)}</b> in the last {window} ({pace})"
    share = _share(scheduled, allowed)
    lines = [
        f"<p>Sent: {sent}</p>",
        f"<p>Scheduled: <b>{rate(scheduled)}</b>{f' ({share})' if share else ''}</p>",
        f"<p>Budget: <b>{rate(allowed)}</b> {_named('api.max_requests_per_minute')}</p>",
    ]
    over = scheduled is not None and allowed is not None and scheduled > allowed
    if over:
        lines.append('<p class="bad">&#x26A0; the schedule asks for more: polls fall behind</p>')
    return _card("Request budget", "bad" if over else "good", lines)


def _share(per_minute: float | None, budget: float | None) -> str:
    """``7% of the budget``; nothing without both."""
    if per_minute is None or not budget:
        return ""
    percent = 100 * per_minute / budget
    return f"{'under 1' if 0 < percent < 1 else number(percent, 0)}% of the budget"


def _phases(phases: Mapping[str, int], messages: Sequence[TrackedMessage]) -> str:
    """The tracked messages by phase (as ``/metrics`` counts them), and those in trouble."""
    counts = " · ".join(f"{html.escape(phase)} <b>{n}</b>" for phase, n in phases.items())
    lines = [
        f"<p><b>{sum(phases.values())}</b> tracked {_named('mailpartner_exporter_messages')}</p>",
        f"<p>{counts}</p>",
    ]
    failed = sum(map(failing, messages))
    missing = sum(m.not_found for m in messages)
    if failed:
        lines.append(f'<p class="bad">&#x26A0; last poll failed: <b>{failed}</b></p>')
    if missing:
        lines.append(f'<p class="bad">&#x2716; not found: <b>{missing}</b> (check the ID)</p>')
    return _card("Messages", "bad" if failed or missing else "good", lines)


def _named(name: str) -> str:
    """The series or setting a figure comes from, smaller than the figure."""
    return f'<small class="src">({name})</small>'


def _card(title: str, health: str, lines: list[str]) -> str:
    return f'<div class="card {health}"><h3>{title}</h3>{"".join(lines)}</div>'


def _credits(credits: Mapping[str, float], low: Mapping[str, float]) -> str:
    lines, short = [], False
    for field, value in sorted(credits.items()):
        name, threshold = html.escape(field), low.get(field)
        if threshold is None:
            lines.append(f"<p>{name}: <b>{number(value)}</b></p>")
        elif value < threshold:
            short = True
            lines.append(
                f'<p class="bad">&#x26A0; {name}: <b>{number(value)}</b>, below'
                f" {number(threshold)} {_named('low_credits')}</p>"
            )
        else:
            lines.append(f"<p>{name}: <b>{number(value)}</b> (alert below {number(threshold)})</p>")
    return _card("Account credits", "bad" if short else "good", lines or ["<p>no answer yet</p>"])


def _newest_failure(messages: Sequence[TrackedMessage]) -> TrackedMessage | None:
    """The message whose poll failed last (a NaN time, from an old state file, is never last)."""
    failed = [
        m
        for m in messages
        if failing(m) and m.last_poll is not None and not math.isnan(m.last_poll)
    ]
    return max(failed, key=operator.attrgetter("last_poll"), default=None)


def failing(message: TrackedMessage) -> bool:
    """Its last poll failed; one the API does not know is marked as not found instead."""
    return not message.poll_ok and bool(message.last_error) and not message.not_found
