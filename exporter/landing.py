"""The status page: links, a summary of the API, the budget and the credits, and one row per
tracked message."""

from __future__ import annotations

import datetime as dt
import html
import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence

from exporter import __version__, calendar
from exporter.config.duration import format_duration
from exporter.config.model import PollingConfig
from exporter.domain import State
from exporter.summary import StatusSummary
from exporter.tracked import TrackedMessage, shown_phase, with_series
from exporter.tracker import MessageBook

# A fixed table layout: columns share the window's width, long text wraps (an ID or an error
# without spaces too), so the last column stays on screen at 1400 px.
_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%;table-layout:fixed;font-size:.9em}
th,td{padding:.3em .4em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top;
overflow-wrap:anywhere}th{font-size:.9em;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}td.n{overflow-wrap:normal}
td.err{color:#b00}time{white-space:nowrap}svg{width:100%;height:12px;display:block;margin-top:.3em}
tr.final td{color:#666}tr.held td{background:#fff8e1}tr.scheduled td{background:#e8f1fb}
tr.failing td{background:#fdecea}tr.failing td:first-child{box-shadow:inset 4px 0 #c62828}
.flag{display:block;color:#b00;font-weight:600}
.key span{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 1em;vertical-align:middle}
.summary{display:flex;flex-wrap:wrap;gap:1em;margin-bottom:1em}
.card{flex:1 1 18em;border:1px solid #ddd;border-left-width:4px;padding:.2em 1em}
.card h3{margin:.4em 0}.card p{margin:.3em 0}.card.good{border-left-color:#2e7d32}
.card.bad{border-left-color:#c62828}.good>.state{color:#2e7d32}.bad>.state,p.bad{color:#b00}"""
# Bar colours per state, also used by the legend.
_COLOURS = {
    State.DELIVERED: "#2e7d32",
    State.FAILED: "#c62828",
    State.PENDING: "#f9a825",
    State.UNKNOWN: "#9e9e9e",
}
_BAR_WIDTH = 160
# Drawn 160 units wide, shown as wide as its column.
_SVG = (
    f'width="{_BAR_WIDTH}" height="12" viewBox="0 0 {_BAR_WIDTH} 12" '
    'preserveAspectRatio="none" role="img"'
)
# Longer than this, a cell shows the start and the whole in its title (a tooltip).
_ID_CHARS, _LABEL_CHARS, _ERROR_CHARS = 40, 120, 160
_COLUMNS = (  # (heading, width): fixed ones in em, the rest share what is left
    ("Message", "7%"),
    ("Labels", "14%"),
    ("Phase", "10%"),
    ("Recipients", "7.5em"),
    *((state.capitalize(), "6em") for state in State),
    ("Cost", "6.5em"),
    ("Sent", "6.5em"),
    ("Last poll", "7em"),
    ("Last error", ""),
)


def render_landing(
    book: MessageBook,
    telemetry_path: str,
    clock: Callable[[], float] = time.time,
    summary: StatusSummary | None = None,
) -> str:
    """The page; with ``summary``, the API, budget and credits above the messages."""
    messages, _ = book.snapshot()
    now = clock()
    # The messages that have series: a page of 100,000 rows would help nobody.
    shown = sorted(with_series(messages, book.metrics.per_message_limit), key=_newest_first)
    rows = "\n".join(_row(m, now, book.polling) for m in shown)
    withheld = len(messages) - len(shown)
    more = f" {withheld} more, without per-message series, are not listed." if withheld else ""
    path = html.escape(telemetry_path)
    top = "" if summary is None else _summary(summary, messages, now)
    columns = "".join(f'<col style="width:{w}">' if w else "<col>" for _, w in _COLUMNS)
    headings = "".join(
        f'<th class="n">{h}</th>' if h in _NUMERIC else f"<th>{h}</th>" for h, _ in _COLUMNS
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Mail Partner exporter</title><style>{_STYLE}</style></head>
<body><h1>Mail Partner exporter</h1>
<p>Version {__version__} · <a href="{path}">Metrics</a> · <a href="/-/healthy">Health</a> ·
<a href="/-/ready">Readiness</a></p>
{top}<h2>Tracked messages ({len(messages)})</h2>
<p class="key">Newest send first.{more}{_legend()}</p>
<table><colgroup>{columns}</colgroup><thead><tr>{headings}</tr></thead><tbody>
{rows}
</tbody></table></body></html>
"""


_NUMERIC = {*(state.capitalize() for state in State), "Cost"}


def _summary(summary: StatusSummary, messages: Sequence[TrackedMessage], now: float) -> str:
    """Three cards: is the API answering, is the budget enough, how many credits are left."""
    if summary.up is None:
        health, state = "idle", "&ndash; no request yet"
    else:
        health, state = ("good", "&#x2714; up") if summary.up else ("bad", "&#x2716; down")
    errors = " · ".join(f"{html.escape(k)} {n}" for k, n in sorted(summary.errors.items()))
    api = [
        f'<p class="state"><b>{state}</b> (mailpartner_up)</p>',
        f"<p>Errors since start: {errors or 'none'}</p>",
        f"<p>429 pauses since start: {summary.rate_limited}</p>",
    ]
    if (failed := _newest_failure(messages)) is not None:
        api.append(
            f"<p>Last failed poll: {_clipped(failed.spec.id, _ID_CHARS)}, "
            f"{_when(failed.last_poll, now)}: {_clipped(failed.last_error, _ERROR_CHARS)}</p>"
        )
    recent = summary.recent
    sent = (
        "&ndash; (just started)"
        if recent is None
        else f"<b>{_number(recent.count, 0)}</b> in the last"
        f" {format_duration(recent.seconds, units=2)} ({_number(recent.per_minute, 1)}/min)"
    )
    budget = [
        f"<p>Sent: {sent}</p>",
        f"<p>Scheduled: <b>{_rate(summary.scheduled)}</b></p>",
        f"<p>Budget: <b>{_rate(summary.budget)}</b> (api.max_requests_per_minute)</p>",
    ]
    scheduled, allowed = summary.scheduled, summary.budget
    over = scheduled is not None and allowed is not None and scheduled > allowed
    if over:
        budget.append('<p class="bad">&#x26A0; the schedule asks for more: polls fall behind</p>')
    cards = [
        _card("Mail Partner API", health, api),
        _card("Request budget", "bad" if over else "good", budget),
    ]
    if summary.credits is not None:
        cards.append(_credits(summary.credits, summary.low_credits))
    return f'<section class="summary">{"".join(cards)}</section>\n'


def _card(title: str, health: str, lines: list[str]) -> str:
    return f'<div class="card {health}"><h3>{title}</h3>{"".join(lines)}</div>'


def _credits(credits: Mapping[str, float], low: Mapping[str, float]) -> str:
    lines, short = [], False
    for field, value in sorted(credits.items()):
        name, threshold = html.escape(field), low.get(field)
        if threshold is None:
            lines.append(f"<p>{name}: <b>{_number(value)}</b></p>")
        elif value < threshold:
            short = True
            lines.append(
                f'<p class="bad">&#x26A0; {name}: <b>{_number(value)}</b>, below'
                f" {_number(threshold)} (low_credits)</p>"
            )
        else:
            lines.append(
                f"<p>{name}: <b>{_number(value)}</b> (alert below {_number(threshold)})</p>"
            )
    return _card("Account credits", "bad" if short else "good", lines or ["<p>no answer yet</p>"])


def _newest_failure(messages: Sequence[TrackedMessage]) -> TrackedMessage | None:
    """The message whose poll failed last (a NaN time, from an old state file, is never last)."""
    failed = [
        m
        for m in messages
        if _failing(m) and m.last_poll is not None and not math.isnan(m.last_poll)
    ]
    return max(failed, key=operator.attrgetter("last_poll"), default=None)


def _failing(message: TrackedMessage) -> bool:
    return not message.poll_ok and bool(message.last_error)


def _row(message: TrackedMessage, now: float, polling: PollingConfig) -> str:
    aggregate = message.aggregate
    counts = {s: str(aggregate.states[s]) if aggregate else "&ndash;" for s in State}
    cost = _number(aggregate.cost) if aggregate else "&ndash;"
    labels = ", ".join(f"{k}={v}" for k, v in message.spec.labels.items())
    last_poll = _when(message.last_poll, now)
    kind = shown_phase(message)
    if _failing(message):
        kind += " failing"
        last_poll = f'<span class="flag">&#x26A0; failed</span> {last_poll}'
    cells = [
        f"<td>{_clipped(message.spec.id, _ID_CHARS)}</td>",
        f"<td>{_clipped(labels, _LABEL_CHARS)}</td>",
        f"<td>{_phase(message, now, polling)}</td>",
        f"<td>{_bar(message)}</td>",
        *(f'<td class="n" data-state="{s}">{c}</td>' for s, c in counts.items()),
        f'<td class="n">{cost}</td>',
        f"<td>{_when(message.sent_at, now)}</td>",
        f"<td>{last_poll}</td>",
        f'<td class="err">{_clipped(message.last_error, _ERROR_CHARS)}</td>',
    ]
    message_id = html.escape(message.spec.id)
    return f'<tr data-message-id="{message_id}" class="{kind}">{"".join(cells)}</tr>'


def _clipped(text: str, limit: int) -> str:
    """``text`` escaped; past ``limit`` characters cut, whole in the title."""
    if len(text) <= limit:
        return html.escape(text)
    return f'<span title="{html.escape(text)}">{html.escape(text[: limit - 1])}&hellip;</span>'


def _phase(message: TrackedMessage, now: float, polling: PollingConfig) -> str:
    """The phase, and what an operator needs beside it: when a deferred or held send goes
    out, or why a final one ended."""
    shown = shown_phase(message)
    if shown == "scheduled" and (scheduled := message.spec.scheduled_at) is not None:
        opening = calendar.release(scheduled)
        if opening == scheduled or polling.transactional(message.spec):
            return f"scheduled for {_local(scheduled, now)}"
        # Deferred into quiet hours: the platform will hold it until the next opening.
        return f"scheduled for {_local(scheduled, now)}, held until {_local(opening, now)}"
    if shown == "held" and message.held_until is not None:
        return f"held until {_local(message.held_until, now)}"
    if message.not_found:
        return f"{shown} (not found)"
    return f"{shown} (nothing reported)" if message.unreported else shown


def _local(when: float, now: float) -> str:
    """A time to come as Mail Partner's calendar reads it (Europe/Paris), UTC in its title."""
    iso = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f'<time datetime="{iso}" title="{iso}">{calendar.describe_release(when, now)}</time>'


def _newest_first(message: TrackedMessage) -> tuple[bool, float]:
    # NaN is neither before nor after anything, and would leave the other rows unsorted too.
    return math.isnan(message.sent_at), -message.sent_at


def _number(value: float, places: int = 4) -> str:
    """Rounded to ``places`` decimals, trailing zeros trimmed: ``3.15``, not
    ``3.149999999999989``. NaN, inf or 1e300 (from an old state file) as Python writes them,
    not 300 digits wide."""
    if not (math.isfinite(value) and abs(value) < 1e12):
        return html.escape(str(value))
    text = f"{value:.{places}f}"
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return "0" if text == "-0" else text


def _rate(per_minute: float | None) -> str:
    return "&ndash;" if per_minute is None else f"{_number(per_minute, 1)}/min"


def _bar(message: TrackedMessage) -> str:
    """A stacked bar of the message's recipients by state, as inline SVG."""
    aggregate = message.aggregate
    total = aggregate.recipients if aggregate else 0
    if aggregate is None or total == 0:
        return (
            f"<svg {_SVG}><title>no reports yet</title>"
            f'<rect width="{_BAR_WIDTH}" height="12" fill="#eee"/></svg>'
        )
    parts, x = [], 0.0
    for state in State:
        count = aggregate.states[state]
        width = _BAR_WIDTH * count / total
        if count:
            parts.append(
                f'<rect x="{x:.1f}" width="{width:.1f}" height="12" '
                f'fill="{_COLOURS[state]}"><title>{state} {count} '
                f"({100 * count / total:.1f}%)</title></rect>"
            )
        x += width
    return f"<svg {_SVG}>{''.join(parts)}</svg>"


def _legend() -> str:
    return "".join(f'<span style="background:{_COLOURS[s]}"></span>{s}' for s in State)


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "never"
    try:
        iso = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        # NaN, infinite, or outside the years 1-9999 (a registration or a state file from
        # before times were checked): said as it is, so one bad message cannot take the page.
        return f'<span title="not a valid time">invalid ({html.escape(str(timestamp))})</span>'
    return f'<time datetime="{iso}" title="{iso}">{_age(now - timestamp)}</time>'


def _age(seconds: float) -> str:
    """``5m12s ago``, ``1d23h ago``: two units at most; ``in 3m`` for a time to come."""
    if abs(seconds) < 1:
        return "just now"
    if seconds < 0:
        return f"in {format_duration(-seconds, units=2)}"
    return f"{format_duration(seconds, units=2)} ago"
