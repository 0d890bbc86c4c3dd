"""logfmt and JSON log lines, with the API key scrubbed from every one of them."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import IO

from exporter.secret import Redactor

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}
# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class _Formatter(logging.Formatter):
    def __init__(self, style: str, redact: Redactor) -> None:
        super().__init__()
        self._output = style
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": _NAMES.get(record.levelno, "info"),
            "caller": f"{record.module}.py:{record.lineno}",
            "msg": record.getMessage(),
        }
        fields.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if self._output == "json":
            line = json.dumps(fields, default=str, ensure_ascii=False)
        else:
            line = " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())
        return self._redact(line)


def _logfmt(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\\\n\t'):
        return text
    return json.dumps(text, ensure_ascii=False)


def setup_logging(level: str, style: str, redact: Redactor, stream: IO[str] | None = None) -> None:
    """Send every log line to ``stream`` (stderr) in ``style``, at ``level`` and above."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(style, redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # urllib3 logs full request URLs at debug level; they carry the key.
    logging.getLogger("urllib3").setLevel(max(LEVELS[level], logging.INFO))
