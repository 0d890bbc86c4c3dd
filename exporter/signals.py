"""SIGINT and SIGTERM on the command line: from the process's start to its return, at any
moment, a clean stop within seconds and no traceback (``exporter.cli`` uses these)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import Any, Generic, Protocol, TypeVar

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers
_T = TypeVar("_T")


class Stoppable(Protocol):
    """What an interrupted command line stops: cut off its requests, save its state."""

    def stop_now(self) -> None: ...


class Interrupted(BaseException):
    """A SIGINT or SIGTERM, raised in the main thread by ``StopSignals``. Not an ``Exception``,
    so that no ``except Exception`` on the way (a plugin's start-up) takes it for an error."""

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum).name
        super().__init__(self.signal)


class StopSignals:
    """SIGINT and SIGTERM as the command line takes them, from its start to its return.

    While armed, a signal raises ``Interrupted`` in the main thread and disarms; while
    disarmed, one is held until ``arm()``, which raises it then. So whoever catches one
    decides whether the next may cut short what it does next, and none is lost in between.
    The main thread only ever builds (start-up), waits (``--once``'s polls, serving, shutting
    down) or saves, so unwinding it leaves nothing half-done that matters; the exporter's
    own threads are told to stop, never unwound. ``phase`` and ``exporter`` say what was
    interrupted and what to save. ``received`` lists signals noted before the handlers were
    in (``exporter.__main__`` notes them from the process's first line): held, as if they
    came now.
    """

    def __init__(self, received: Sequence[int] = ()) -> None:
        self.phase = "start-up"
        self.exporter: Stoppable | None = None
        self._received = received
        self._held: int | None = None
        self._armed = False
        self._previous: dict[int, _Handler] = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self._on_signal)
            if previous is not None:
                self._previous[signum] = previous
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def disarm(self) -> None:
        """Hold the next signal until ``arm()``."""
        self._armed = False

    def arm(self) -> None:
        """Let a signal interrupt the main thread: one held or received already, at once.
        Armed first, so that one coming meanwhile raises itself rather than wait held."""
        self._armed = True
        held, self._held = self._held, None
        if held is None and self._received:  # noted before ``__enter__``, which ends that
            held = self._received[0]
        self._received = ()
        if held is not None:
            self._armed = False
            raise Interrupted(held)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._armed:
            self._armed = False
            raise Interrupted(signum)
        self._held = signum


class Background(Generic[_T]):
    """``work()`` in a thread of its own, while the main thread waits for its result: a
    signal, which Python handles in the main thread, then interrupts nothing but the wait.

    The main thread waits by sleeping in short slices: an untimed wait on a lock (``join``,
    ``Event.wait``) is not woken by a signal the kernel hands to another thread, and an
    exception raised inside one can leave it wrong (Python 3.11's ``join`` then takes a
    running thread for stopped).
    """

    def __init__(self, name: str, work: Callable[[], _T]) -> None:
        self._work = work
        self._outcome: list[_T] = []
        self._error: list[BaseException] = []
        self._finished = threading.Event()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def result(self) -> _T:
        """What ``work()`` returned, or raised."""
        while not self._finished.is_set():
            time.sleep(0.1)
        if self._error:
            raise self._error[0]
        return self._outcome[0]

    def _run(self) -> None:
        try:
            self._outcome.append(self._work())
        except BaseException as e:  # raised in the main thread, by result()
            self._error.append(e)
        finally:
            self._finished.set()
