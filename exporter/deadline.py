"""Each request to an API ends by its deadline, however slowly the upstream answers.

``requests``' timeout bounds each socket read, and a blocked read can only be ended from
another thread, by shutting its socket. So each request gets a ``Watch``; the connection
classes below tell it which connection carries the request (pooled ones are reused, so on
each request, not only on connect), and one watchdog thread cuts off those past deadline.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests
import requests.adapters
import urllib3
import urllib3.connection

DEADLINE = "deadline"
ABORTED = "aborted"
# The request this thread is making, for the connection classes to find.
current_watch: contextvars.ContextVar[Watch | None] = contextvars.ContextVar(
    "request_watch", default=None
)


class Watch:
    """One request's deadline (``time.monotonic``), and the connection it is on."""

    def __init__(self, deadline: float, lock: threading.Lock) -> None:
        self.deadline = deadline
        self.cut: str | None = None  # why it was cut off: DEADLINE or ABORTED
        self._lock = lock
        self._connection: _WatchedHTTPConnection | None = None
        self._finished = False

    @property
    def expired(self) -> bool:
        return self.cut is not None or time.monotonic() >= self.deadline

    def attach(self, connection: _WatchedHTTPConnection) -> None:
        """The request goes over ``connection``: shut it at once if already cut off."""
        with self._lock:
            if not self._finished:
                # A connection goes back to the pool before the request that used it ends
                # (at the body's last byte): whoever takes it next owns it.
                self._connection, connection.watch = connection, self
                if self.cut is not None:
                    _shut(connection)

    def cut_off(self, why: str) -> None:
        with self._lock:
            self.cut_off_locked(why)

    def cut_off_locked(self, why: str) -> None:
        if self._finished or self.cut is not None:
            return
        self.cut = why
        if self._connection is not None and self._connection.watch is self:
            _shut(self._connection)

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            self._connection = None


def _shut(connection: urllib3.connection.HTTPConnection) -> None:
    """End any read blocked on ``connection``. A pooled connection that reads EOF is
    dropped by urllib3, so this one is never reused."""
    sock = connection.sock
    if sock is not None and not isinstance(sock, socket.socket):
        sock = getattr(sock, "socket", None)  # TLS within TLS (an HTTPS proxy)
    if sock is None:
        return  # still connecting: the connect timeout bounds that
    with contextlib.suppress(OSError):  # already closed
        # Not SSLSocket.shutdown: it would drop its TLS state under the reading thread.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """The thread that cuts off requests at their deadline: one for the process, started
    with the first request. Finished requests stay queued until their deadline, inert."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()  # ties: never compare watches
        self._thread: threading.Thread | None = None

    def watch(self, timeout: float) -> Watch:
        with self._lock:
            watch = Watch(time.monotonic() + timeout, self._lock)
            heapq.heappush(self._queue, (watch.deadline, next(self._order), watch))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="request-deadlines", daemon=True
                )
                self._thread.start()
            elif self._queue[0][2] is watch:  # sooner than the thread waits for
                self._changed.notify()
        return watch

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._queue and self._queue[0][0] <= now:
                    heapq.heappop(self._queue)[2].cut_off_locked(DEADLINE)
                self._changed.wait(self._queue[0][0] - now if self._queue else None)


WATCHDOG = _Watchdog()


def innermost(error: BaseException) -> BaseException:
    """The innermost cause of a failed request: urllib3's outer messages embed the URL (and
    so the key), and repeat what the inner one says."""
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    return error


@contextlib.contextmanager
def watching(timeout: float) -> Iterator[Watch]:
    """A deadline ``timeout`` from now for the request this thread makes in the block: past
    it, the request's socket is shut and ``watch.cut`` says so."""
    watch = WATCHDOG.watch(timeout)
    token = current_watch.set(watch)
    try:
        yield watch
    finally:
        current_watch.reset(token)
        watch.finish()


class _WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    """A connection that the request running in this thread watches (see ``Watch``)."""

    watch: Watch | None = None  # the request it carries, or carried last

    def connect(self) -> None:
        # A connect (TLS handshake included) ends within the connect timeout, but cannot be
        # cut short: a request cut off meanwhile is shut as soon as it is connected.
        super().connect()
        watch = current_watch.get()
        if watch is not None:
            watch.attach(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        watch = current_watch.get()
        if watch is not None:
            watch.attach(self)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(_WatchedHTTPConnection, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """``requests``' adapter over the watched connections, direct or through an HTTP proxy."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS has connection classes of its own
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager
