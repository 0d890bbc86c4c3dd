"""Which client connections the HTTP server holds, and for how long.

A connection's thread flags each wait on its client: for the bytes of a request, or for the
client to take its answer. ``Connections.sweep`` closes the ones waiting past their deadline,
``make_room`` keeps them under the cap by closing the longest idle first, and ``AcceptBackoff``
paces accept when the process runs out of file descriptors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger(__name__)
# An answer goes out in slices, each to be taken within the idle timeout: at least 25 KiB/s.
_SLICE = 256 * 1024
_SWEEP_EVERY = 0.05


class Connection:
    """A client connection, and until when it may keep its thread waiting."""

    __slots__ = (
        "accepted",
        "clock",
        "ended",
        "reading",
        "request_due",
        "send_due",
        "sock",
        "timeout",
        "writing",
    )

    def __init__(self, accepted: socket.socket, clock: Callable[[], float], timeout: float) -> None:
        self.clock, self.timeout = clock, timeout
        self.accepted = accepted
        self.sock = accepted  # the TLS socket once wrapped: same descriptor, new owner
        self.request_due = self.send_due = clock() + timeout
        self.reading = False  # waiting for the client's next bytes
        self.writing = False  # waiting for the client to take the answer
        self.ended = False  # the stream from the client ended (it left, or was dropped)

    def expect_request(self) -> None:
        """The client has ``timeout`` from now to send its next request."""
        self.request_due = self.clock() + self.timeout

    def reader(self) -> io.BufferedReader:
        return io.BufferedReader(_Reader(self))

    def writer(self) -> io.BufferedIOBase:
        return _Writer(self)

    def drop(self) -> None:
        # socket's own shutdown: SSLSocket's would also drop its TLS state, which the
        # connection's thread may be using right now; the thread sees the end of the stream.
        with contextlib.suppress(OSError):  # the client left first
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class Connections:
    """The connections being served, at most ``limit``, each watched against its deadlines."""

    def __init__(
        self, limit: int, idle_timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._open: dict[socket.socket, Connection] = {}
        self._dropped: dict[socket.socket, Connection] = {}  # until their threads close them
        self._changed = threading.Condition()
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._open)

    def add(self, sock: socket.socket) -> None:
        with self._changed:
            self._open[sock] = Connection(sock, self.clock, self.idle_timeout)

    def serving(self, sock: socket.socket) -> Connection | None:
        """The connection accepted as ``sock``, unless it was dropped."""
        return self._open.get(sock)

    def find(self, sock: socket.socket) -> Connection | None:
        return self._open.get(sock) or self._dropped.get(sock)

    def remove(self, sock: socket.socket) -> None:
        with self._changed:
            self._open.pop(sock, None)
            self._dropped.pop(sock, None)
            self._changed.notify_all()

    def make_room(self, wait: float) -> bool:
        """Whether a new connection may be accepted now. At the cap, the one waiting longest
        for a request is closed to make room; if all are busy, this waits up to ``wait``
        seconds for one to end."""
        with self._changed:
            if len(self._open) >= self.limit and self._drop_longest_idle() is None:
                self._changed.wait(wait)
            return len(self._open) < self.limit

    def free_descriptor(self, wait: float) -> bool:
        """Close the connection waiting longest for a request, and wait up to ``wait`` seconds
        for its thread to close it. False if none is waiting for a request."""
        with self._changed:
            dropped = self._drop_longest_idle()
            if dropped is not None:
                self._changed.wait_for(lambda: dropped.accepted not in self._dropped, wait)
            return dropped is not None

    def sweep(self) -> None:
        """Close the connections that kept their thread waiting past a deadline."""
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY
        with self._changed:
            for late in [
                c
                for c in self._open.values()
                if (c.reading and c.request_due < now) or (c.writing and c.send_due < now)
            ]:
                self._drop(late)

    def drop_all(self) -> None:
        with self._changed:
            for connection in list(self._open.values()):
                self._drop(connection)

    def _drop_longest_idle(self) -> Connection | None:
        idle = [c for c in self._open.values() if c.reading]
        if not idle:
            return None
        longest = min(idle, key=lambda c: c.request_due)
        self._drop(longest)
        return longest

    def _drop(self, connection: Connection) -> None:
        # Out of the count at once: its thread ends as soon as it sees the end of the stream.
        self._dropped[connection.accepted] = self._open.pop(connection.accepted)
        connection.drop()


class _Reader(io.RawIOBase):
    """The client's bytes; each wait for them is flagged for the deadline sweep."""

    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self._connection = connection

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        connection = self._connection
        connection.reading = True
        try:
            received = connection.sock.recv_into(buffer)
        finally:
            connection.reading = False
        connection.ended = received == 0
        return received


class _Writer(io.BufferedIOBase):
    """Unbuffered writes to the client, a slice at a time, each under the idle timeout."""

    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self._connection = connection

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        connection, view = self._connection, memoryview(data).cast("B")
        connection.writing = True
        try:
            for start in range(0, len(view), _SLICE):
                connection.send_due = connection.clock() + connection.timeout
                connection.sock.sendall(view[start : start + _SLICE])
        finally:
            connection.writing = False
        return len(view)


class AcceptBackoff:
    """How long to wait after accept fails for want of file descriptors; a warning a minute."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        first: float = 0.1,
        longest: float = 1.0,
        log_every: float = 60.0,
    ) -> None:
        self._clock, self._first, self._longest, self._log_every = clock, first, longest, log_every
        self._delay = first
        self._failures = 0
        self._next_log = float("-inf")

    def failed(self, error: OSError, connections: int) -> float:
        delay, self._delay = self._delay, min(self._delay * 2, self._longest)
        self._failures += 1
        now = self._clock()
        if now >= self._next_log:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning(
                "cannot accept connections: out of file descriptors",
                extra={
                    "err": os.strerror(error.errno or 0),
                    "failures": self._failures,
                    "connections": connections,
                    "nofile_limit": soft,
                },
            )
            self._next_log, self._failures = now + self._log_every, 0
        return delay

    def succeeded(self) -> None:
        self._delay = self._first
