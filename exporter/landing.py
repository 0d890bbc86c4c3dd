"""The status page: links, a summary of the API, the budget, the credits and the messages by
phase, then one row per tracked message, newest first."""

from __future__ import annotations

import datetime as dt
import html
import math
import re
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from exporter import __version__, calendar
from exporter.cards import failing, summary_cards
from exporter.config.model import PollingConfig
from exporter.domain import State
from exporter.summary import StatusSummary
from exporter.tracked import TrackedMessage, shown_phase, with_series
from exporter.tracker import MessageBook
from exporter.wording import ID_CHARS, age_in_words, clipped, in_words, number, unbroken, when

# A fixed table layout: columns share the window's width, long text wraps (an ID or an error
# without spaces too), so the last column stays on screen at 1280 px.
_STYLE = """body{font-family:system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;width:100%;table-layout:fixed;font-size:.85em}
th,td{padding:.3em .35em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top;
overflow-wrap:anywhere}th{font-size:.9em;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}td.n{overflow-wrap:normal}
td.err{color:#b00}time.at{white-space:nowrap}svg{width:100%;height:12px;display:block;margin-top:.3em}
tr.final td{color:#666}tr.held td{background:#fff8e1}tr.scheduled td{background:#e8f1fb}
tr.failing td{background:#fdecea}tr.failing td:first-child{box-shadow:inset 4px 0 #c62828}
tr.not-found td{background:#f3e5f5}tr.not-found td:first-child{box-shadow:inset 4px 0 #6a1b9a}
.flag{display:block;color:#b00;font-weight:600}.flag.gone{color:#6a1b9a}
.key span{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 1em;vertical-align:middle}
.summary{display:flex;flex-wrap:wrap;gap:1em;margin-bottom:1em}
.card{flex:1 1 16em;min-width:0;border:1px solid #ddd;border-left-width:4px;padding:.2em 1em;
overflow-wrap:break-word}.card h3{margin:.4em 0}.card p{margin:.3em 0}
.card.good{border-left-color:#2e7d32}.card.bad{border-left-color:#c62828}
.src{font-size:.8em;color:#555}.good>.state{color:#2e7d32}.bad>.state,p.bad{color:#b00}"""
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
_LABEL_CHARS, _ERROR_CHARS = 120, 100
_COLUMNS = (  # (heading, width): fixed ones in em, the rest share what is left
    ("Message", "7.5%"),
    ("Labels", "13%"),
    ("Phase", "10.5%"),
    ("Recipients", "6.2em"),
    *((state.capitalize(), "5.6em") for state in State),
    ("Cost", "6.6em"),
    ("Sent", "7.2em"),
    ("Last poll", "7.2em"),
    ("Last error", ""),
)
_NUMERIC = {*(state.capitalize() for state in State), "Cost"}
# ``/?refresh=N``: the page reloads itself every N seconds, N held within these bounds.
_REFRESH_OFFERED, _REFRESH_MIN, _REFRESH_MAX = 30, 5, 3600


def render_landing(
    book: MessageBook,
    telemetry_path: str,
    clock: Callable[[], float] = time.time,
    summary: StatusSummary | None = None,
    *,
    query: str = "",
) -> str:
    """The page; with ``summary``, the API, budget, credits and phases above the messages.
    ``query`` is the request's query string: ``refresh=30`` reloads the page every 30 s."""
    messages, _ = book.snapshot()
    now = clock()
    # The messages that have series: a page of 100,000 rows would help nobody.
    shown = sorted(with_series(messages, book.metrics.per_message_limit), key=_newest_first)
    rows = "\n".join(_row(m, now, book.polling) for m in shown)
    withheld = len(messages) - len(shown)
    more = f" {withheld} more, without per-message series, are not listed." if withheld else ""
    path = html.escape(telemetry_path)
    top = "" if summary is None else summary_cards(summary, messages, now)
    columns = "".join(f'<col style="width:{w}">' if w else "<col>" for _, w in _COLUMNS)
    headings = "".join(
        f'<th class="n">{h}</th>' if h in _NUMERIC else f"<th>{h}</th>" for h, _ in _COLUMNS
    )
    reload, switch = _auto_refresh(refresh_seconds(query))
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{reload}<title>Mail Partner exporter</title>
<style>{_STYLE}</style></head>
<body><h1>Mail Partner exporter</h1>
<p>Version {__version__} · <a href="{path}">Metrics</a> · <a href="/-/healthy">Health</a> ·
<a href="/-/ready">Readiness</a> · <span class="refresh">{switch}</span></p>
{top}<h2>Tracked messages ({len(messages)})</h2>
<p class="key">Newest first by <b>Sent</b>: when a message went out, or is due to (a deferred
send); for one that came without a send time, when this exporter first saw it.{more}</p>
<p class="key"><b>&#x26A0; failed</b>: its last poll failed · <b>&#x2716; not found</b>: the API
does not know its ID · recipients:{_legend()}</p>
<table><colgroup>{columns}</colgroup><thead><tr>{headings}</tr></thead><tbody>
{rows}
</tbody></table></body></html>
"""


def refresh_seconds(query: str) -> int | None:
    """The seconds between reloads a query string asks for (``refresh=30``), held within
    5..3600; None (no reloading) without one, or for anything but a whole number."""
    values = parse_qs(query).get("refresh")
    if not values or not re.fullmatch(r"[0-9]+", values[-1]):
        return None
    digits = values[-1].lstrip("0") or "0"
    if len(digits) > len(str(_REFRESH_MAX)):  # no need to read a thousand digits
        return _REFRESH_MAX
    return min(max(int(digits), _REFRESH_MIN), _REFRESH_MAX)


def _auto_refresh(seconds: int | None) -> tuple[str, str]:
    """The ``<meta>`` that reloads the page every ``seconds``, and the link that turns it off;
    without ``seconds``, no ``<meta>`` and a link that turns it on."""
    if seconds is None:
        offered = f"/?refresh={_REFRESH_OFFERED}"
        return "", f'Auto-refresh off (<a href="{offered}">turn on: every {_REFRESH_OFFERED} s</a>)'
    every = unbroken(in_words(seconds))
    meta = f'<meta http-equiv="refresh" content="{seconds}">'
    return meta, f'Auto-refresh every {every} (<a href="/">turn off</a>)'


def _row(message: TrackedMessage, now: float, polling: PollingConfig) -> str:
    aggregate = message.aggregate
    counts = {s: str(aggregate.states[s]) if aggregate else "&ndash;" for s in State}
    cost = number(aggregate.cost) if aggregate else "&ndash;"
    labels = ", ".join(f"{k}={v}" for k, v in message.spec.labels.items())
    last_poll = when(message.last_poll, now)
    kind = shown_phase(message)
    if message.not_found:
        kind += " not-found"
    elif failing(message):
        kind += " failing"
        last_poll = f'<span class="flag">&#x26A0; failed</span> {last_poll}'
    cells = [
        f"<td>{clipped(message.spec.id, ID_CHARS)}</td>",
        f"<td>{clipped(labels, _LABEL_CHARS)}</td>",
        f"<td>{_phase(message, now, polling)}</td>",
        f"<td>{_bar(message)}</td>",
        *(f'<td class="n" data-state="{s}">{c}</td>' for s, c in counts.items()),
        f'<td class="n">{cost}</td>',
        f"<td>{when(message.start, now)}</td>",
        f"<td>{last_poll}</td>",
        f'<td class="err">{clipped(message.last_error, _ERROR_CHARS)}</td>',
    ]
    message_id = html.escape(message.spec.id)
    return f'<tr data-message-id="{message_id}" class="{kind}">{"".join(cells)}</tr>'


def _phase(message: TrackedMessage, now: float, polling: PollingConfig) -> str:
    """The phase, and what an operator needs beside it: when a deferred or held send goes
    out (how soon, for a hold: the Sent column says it for a deferred one), or why a final one
    ended."""
    shown = shown_phase(message)
    if shown == "scheduled" and (scheduled := message.spec.scheduled_at) is not None:
        opening = calendar.release(scheduled)
        if opening == scheduled or polling.transactional(message.spec):
            return f"scheduled for {_local(scheduled, now)}"
        # Deferred into quiet hours: the platform will hold it until the next opening.
        return f"scheduled for {_local(scheduled, now)}, {_held_until(opening, now)}"
    if shown == "held" and message.held_until is not None:
        return _held_until(message.held_until, now)
    if message.not_found:
        return f'{shown} <span class="flag gone">&#x2716; not found</span>'
    return f"{shown} (nothing reported)" if message.unreported else shown


def _held_until(opening: float, now: float) -> str:
    return f"held until {_local(opening, now)} ({unbroken(age_in_words(now - opening))})"


def _local(when: float, now: float) -> str:
    """A time to come as Mail Partner's calendar reads it (Europe/Paris), UTC in its title."""
    iso = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    said = calendar.describe_release(when, now)  # kept on one line: ``Tue 08:00``
    return f'<time class="at" datetime="{iso}" title="{iso}">{said}</time>'


def _newest_first(message: TrackedMessage) -> tuple[bool, float]:
    # NaN is neither before nor after anything, and would leave the other rows unsorted too.
    return math.isnan(message.start), -message.start


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
