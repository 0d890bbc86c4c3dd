"""The landing page: links, and one row per tracked message."""

from __future__ import annotations

import datetime as dt
import html
import math
import time
from collections.abc import Callable

from exporter import __version__, calendar
from exporter.config.duration import format_duration
from exporter.config.model import PollingConfig
from exporter.domain import State
from exporter.tracked import TrackedMessage, shown_phase, with_series
from exporter.tracker import MessageBook

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}th,td{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.err{color:#b00}th,time{white-space:nowrap}
.key span{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 1em;vertical-align:middle}"""
# Bar colours per state, also used by the legend.
_COLOURS = {
    State.DELIVERED: "#2e7d32",
    State.FAILED: "#c62828",
    State.PENDING: "#f9a825",
    State.UNKNOWN: "#9e9e9e",
}
_BAR_WIDTH = 160


def render_landing(
    book: MessageBook, telemetry_path: str, clock: Callable[[], float] = time.time
) -> str:
    messages, _ = book.snapshot()
    now = clock()
    # The messages that have series: a page of 100,000 rows would help nobody.
    shown = sorted(with_series(messages, book.metrics.per_message_limit), key=_newest_first)
    rows = "\n".join(_row(m, now, book.polling) for m in shown)
    withheld = len(messages) - len(shown)
    more = f" {withheld} more, without per-message series, are not listed." if withheld else ""
    path = html.escape(telemetry_path)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Mail Partner exporter</title><style>{_STYLE}</style></head>
<body><h1>Mail Partner exporter</h1>
<p>Version {__version__} · <a href="{path}">Metrics</a> · <a href="/-/healthy">Health</a> ·
<a href="/-/ready">Readiness</a></p>
<h2>Tracked messages ({len(messages)})</h2>
<p class="key">Newest send first.{more}{_legend()}</p>
<table><thead><tr><th>Message</th><th>Labels</th><th>Phase</th><th>Recipients</th>
<th>Delivered</th><th>Failed</th><th>Pending</th><th>Unknown</th><th>Cost</th><th>Sent</th>
<th>Last poll</th><th>Last error</th></tr></thead><tbody>
{rows}
</tbody></table></body></html>
"""


def _row(message: TrackedMessage, now: float, polling: PollingConfig) -> str:
    aggregate = message.aggregate
    counts = {s: str(aggregate.states[s]) if aggregate else "&ndash;" for s in State}
    cost = _cost(aggregate.cost) if aggregate else "&ndash;"
    labels = ", ".join(f"{k}={v}" for k, v in message.spec.labels.items())
    cells = [
        f"<td>{html.escape(message.spec.id)}</td>",
        f"<td>{html.escape(labels)}</td>",
        f"<td>{_phase(message, now, polling)}</td>",
        f"<td>{_bar(message)}</td>",
        *(f'<td class="n" data-state="{s}">{c}</td>' for s, c in counts.items()),
        f'<td class="n">{cost}</td>',
        f"<td>{_when(message.sent_at, now)}</td>",
        f"<td>{_when(message.last_poll, now)}</td>",
        f'<td class="err">{html.escape(message.last_error)}</td>',
    ]
    return f'<tr data-message-id="{html.escape(message.spec.id)}">{"".join(cells)}</tr>'


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


def _cost(cost: float) -> str:
    # NaN, inf or 1e300 from an old state file: as Python writes it, not 300 digits wide.
    return f"{cost:.4f}" if math.isfinite(cost) and abs(cost) < 1e12 else html.escape(str(cost))


def _bar(message: TrackedMessage) -> str:
    """A stacked bar of the message's recipients by state, as inline SVG."""
    aggregate = message.aggregate
    total = aggregate.recipients if aggregate else 0
    if aggregate is None or total == 0:
        return (
            f'<svg width="{_BAR_WIDTH}" height="12" role="img"><title>no reports yet</title>'
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
    return f'<svg width="{_BAR_WIDTH}" height="12" role="img">{"".join(parts)}</svg>'


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
    return f'<time datetime="{iso}" title="{iso}">{format_duration(now - timestamp)} ago</time>'
