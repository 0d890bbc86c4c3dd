"""What the exporter polls: the ``Source`` interface.

A source says *what* it polls (``due``: the requests it wants made now), *how often*
(``next_due``: when it next wants one) and *what series it yields* (``collect``). The
poller runs every source's requests within the budget, concurrency and 429 pause of the
API the source talks to (its ``Upstream``), so a source never sleeps and never makes a
request the budget did not allow. ``PeriodicSource`` is the short way to write one that
makes a request every ``every``; see docs/plugins.md.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client.core import Metric

from exporter.client import PollError
from exporter.config.model import ApiConfig, Config
from exporter.state import MEMORY
from exporter.stats import RequestStats
from exporter.upstream import Upstream, connect

if TYPE_CHECKING:
    from exporter.config.options import Options

log = logging.getLogger(__name__)
Settings = Mapping[str, Any]
# A failed periodic poll is retried after this, doubling up to its interval.
RETRY_AFTER = 10.0


def spread() -> float:
    """A factor around 1 for retry delays, so polls that failed together do not retry together."""
    return random.uniform(0.9, 1.1)  # noqa: S311 - not secret


@dataclass(frozen=True)
class SourceContext:
    """What a source is built with: the loaded config, the Mail Partner API and a clock.

    ``connect`` gives a source that talks to another API (its own base URL and key) an
    ``Upstream`` of its own, with its own budget; requests and failures are counted in
    ``stats`` under the source's metric prefix. ``jitter`` spreads retries (tests hand in a
    constant, as they hand in a clock).
    """

    config: Config
    mailpartner: Upstream
    clock: Callable[[], float] = time.time
    connect: Callable[[ApiConfig, RequestStats], Upstream] = connect
    demo: bool = False
    jitter: Callable[[], float] = spread

    @property
    def state_path(self) -> str:
        """Where sources that keep state between restarts keep it (":memory:": nowhere). The
        demo's simulated world starts afresh each run: it keeps none."""
        return MEMORY if self.demo else self.config.state_path


class Poll(ABC):
    """One request a source wants made; the poller runs ``run`` on a worker thread."""

    def __init__(self, when: float, subject: str) -> None:
        self.when = when  # when it was due: the most overdue poll goes first
        self.subject = subject  # what it is about, for logs (a message ID, a source name)

    def start(self, now: float) -> bool:
        """Claim the poll just before it runs; False if it is no longer wanted."""
        return True

    @abstractmethod
    def run(self) -> None:
        """Make the request and record the outcome; raise ``PollError`` if it failed."""

    def crashed(self, error: Exception) -> None:  # noqa: B027 - an optional hook
        """``run`` raised something other than ``PollError`` (a bug): record it as a failure."""


class Source(ABC):
    """Something polled on a schedule and exposed as series.

    The class is found by its name under ``sources:`` (built in, or through the
    ``mailpartner_exporter.sources`` entry-point group), ``configure``d from that section
    when the config loads, and built with the context and the settings it returned.
    """

    name: str = ""  # its key under ``sources:``; set when it is registered

    def __init__(self, context: SourceContext, settings: Settings) -> None:
        self.context = context
        self.settings = settings
        self.upstream: Upstream = context.mailpartner

    @classmethod
    def configure(cls, options: Options) -> Settings:
        """Read and check this source's config section; report problems with ``options.fail``."""
        return {}

    @property
    def kind(self) -> object:
        """What built it: its class, for a plain source. A reload that names another kind
        under the same name builds a new source instead of reconfiguring this one."""
        return type(self)

    @abstractmethod
    def due(self, now: float, limit: int) -> Sequence[Poll]:
        """Up to ``limit`` polls to make now, most overdue first."""

    def requeue(self, polls: Sequence[Poll]) -> None:  # noqa: B027 - an optional hook
        """Polls ``due`` handed out that could not start after all (the budget ran out)."""

    @abstractmethod
    def next_due(self) -> float | None:
        """When the next poll is due; None if nothing is to be polled."""

    def everything(self, now: float) -> Sequence[Poll]:
        """One poll of everything this source would ever poll (``--once``)."""
        return self.due(float("inf"), 1 << 30)

    @abstractmethod
    def collect(self) -> Iterable[Metric]:
        """This source's series, built fresh for each scrape."""

    def tick(self, now: float) -> None:  # noqa: B027 - an optional hook
        """Called on each turn of the poll loop, for housekeeping."""

    def reconfigure(self, context: SourceContext, settings: Settings) -> bool:
        """Take a reloaded config in place; False (the default) rebuilds the source instead."""
        return False

    def save(self, now: float) -> None:  # noqa: B027 - an optional hook
        """Write what must survive a restart, if anything changed; never raises."""

    def close(self) -> None:  # noqa: B027 - an optional hook
        """The source is going away (a reload dropped it, or shutdown)."""


class PeriodicSource(Source):
    """A source that makes one request every ``every`` (an option, default ``default_every``).

    Write ``fetch`` (the request, with ``self.upstream.client``) and ``collect``. The first
    poll is due at once; a failure is retried after 10 s, then 20 s, … up to ``every``.
    """

    default_every: ClassVar[float] = 300.0

    def __init__(self, context: SourceContext, settings: Settings) -> None:
        super().__init__(context, settings)
        self.every = float(settings.get("every", self.default_every))
        self._lock = threading.Lock()
        self._next: float | None = context.clock()
        self._failures = 0
        self.last_success: float | None = None
        self.ok = False

    @classmethod
    def configure(cls, options: Options) -> Settings:
        return {"every": options.duration("every", cls.default_every)}

    @abstractmethod
    def fetch(self) -> None:
        """Make the request and keep what ``collect`` needs; raise ``PollError`` on failure."""

    def due(self, now: float, limit: int) -> Sequence[Poll]:
        with self._lock:
            if limit < 1 or self._next is None or self._next > now:
                return ()
            when, self._next = self._next, None  # in flight until it ends
        return (_PeriodicPoll(self, when),)

    def requeue(self, polls: Sequence[Poll]) -> None:
        with self._lock:
            for poll in polls:
                self._next = poll.when

    def next_due(self) -> float | None:
        with self._lock:
            return self._next

    def reconfigure(self, context: SourceContext, settings: Settings) -> bool:
        """Take the new settings in place: the last values and the schedule carry on."""
        with self._lock:
            self.context, self.settings = context, settings
            every = float(settings.get("every", self.default_every))
            if self._next is not None and every < self.every:
                self._next = min(self._next, context.clock() + every)
            self.every = every
            self.upstream = context.mailpartner
        return True

    def _finished(self, error: str | None) -> None:
        now = self.context.clock()
        with self._lock:
            self.ok = error is None
            if error is None:
                self._failures = 0
                self.last_success = now
                self._next = now + self.every
            else:
                self._failures += 1
                backoff = RETRY_AFTER * 2 ** min(self._failures - 1, 16)
                self._next = now + min(backoff, self.every) * self.context.jitter()
        if error is not None:
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            log.log(level, "poll failed", extra={"source": self.name, "err": error})


class _PeriodicPoll(Poll):
    def __init__(self, source: PeriodicSource, when: float) -> None:
        super().__init__(when, source.name)
        self.source = source

    def run(self) -> None:
        try:
            self.source.fetch()
        except PollError as e:
            self.source._finished(str(e))
            raise
        self.source._finished(None)

    def crashed(self, error: Exception) -> None:
        self.source._finished(f"internal error: {type(error).__name__}")
