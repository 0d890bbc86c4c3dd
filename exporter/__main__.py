"""``python -m exporter``, and the ``mailpartner-exporter`` command: SIGINT and SIGTERM are
noted from the first line, so that one coming while the program still imports (a third of a
second) ends it quietly too, as soon as it can log; and ignored once ``main`` has returned,
as the interpreter, exiting, would otherwise let one kill the process."""

from __future__ import annotations

import signal
import sys
from types import FrameType

_STOP = (signal.SIGINT, signal.SIGTERM)


def main() -> int:
    received: list[int] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    for signum in _STOP:
        signal.signal(signum, note)
    # A reload asked for before the server runs (it installs its own handler) would kill the
    # process: the config is being read then anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Imported after the handlers are in: a signal during these imports is noted.
    from exporter.cli import main as command_line  # noqa: PLC0415

    try:
        return command_line(received=received)
    finally:
        for signum in (*_STOP, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
