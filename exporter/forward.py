"""A registration for another shard's message goes on to that shard (``shard.peer_url``).

Behind a load-balanced Service, ``POST``/``DELETE /api/v1/messages`` lands on any shard. One
that does not own the message sends the request on to the one that does, its body and
``Authorization`` header as they came, and answers with that shard's answer (status, body,
content type). Without ``peer_url`` it answers 421 Misdirected Request, naming the owner.

A forwarded request carries ``Mailpartner-Forwarded-From: <index>``; if it lands on a shard
that does not own the message either (shards that disagree on the count, a wrong
``peer_url``), that one answers 421 rather than forward it again. The whole exchange ends
within ``timeout`` (5 s): a shard that cannot be reached is a 502, one too slow a 504.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
import urllib3.exceptions

from exporter import __version__
from exporter.config.convert import describe
from exporter.deadline import WatchedAdapter, innermost, watching
from exporter.shard import Shard
from exporter.wsgi import TEXT

log = logging.getLogger(__name__)
FORWARDED_FROM = "Mailpartner-Forwarded-From"
_FORWARDED_FROM_WSGI = "HTTP_" + FORWARDED_FROM.upper().replace("-", "_")
TIMEOUT = 5.0
# A shard's answers to these requests are a few hundred bytes.
MAX_ANSWER = 64 * 1024
# The owner's headers passed back besides Content-Type: a challenge if it wants a password.
_RELAYED = ("WWW-Authenticate",)


@dataclass(frozen=True)
class Relayed:
    """The owner's answer, passed back as it came."""

    status: str
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Refused:
    """Answered here in the API's error style: why the owner's answer is not to be had."""

    status: str
    kind: str
    error: str


class Forwarder:
    """Sends requests on to their owner over one keep-alive session of its own."""

    def __init__(self, session: requests.Session | None = None, timeout: float = TIMEOUT) -> None:
        self._timeout = timeout
        self._session = session or requests.Session()
        # Shards reach each other directly: no proxy or .netrc from the environment.
        self._session.trust_env = False
        self._session.headers["User-Agent"] = f"mailpartner-exporter/{__version__}"
        adapter = WatchedAdapter()  # the watch below bounds each exchange as a whole
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def route(
        self, shard: Shard, message_id: str, environ: Mapping[str, Any], body: bytes | None
    ) -> Relayed | Refused | None:
        """None if ``shard`` owns ``message_id``; else its owner's answer to the request
        (``environ``, with ``body``), or why there is none."""
        if shard.owns(message_id):
            return None
        owner = shard.owner(message_id)
        whose = f"message {message_id} belongs to shard {owner} of {shard.count}"
        if sender := str(environ.get(_FORWARDED_FROM_WSGI, "")):
            by = f"shard {sender}" if sender.isdigit() and len(sender) < 6 else "another shard"
            return _misdirected(
                f"{whose}, not to shard {shard.index}, to which {by} forwarded it:"
                " do the shards agree on their count and shard.peer_url?"
            )
        base = shard.peer(owner)
        if base is None:
            return _misdirected(
                f"{whose}, not to this one ({shard.index}): send it there, or set"
                " shard.peer_url to have the shards forward it"
            )
        # The path as the client sent it (the server decoded it once), and the query.
        target = quote(str(environ.get("PATH_INFO", "")).encode("latin-1", "replace"))
        if query := environ.get("QUERY_STRING"):
            target += f"?{query}"
        headers = {FORWARDED_FROM: str(shard.index)}
        for name, key in (
            ("Content-Type", "CONTENT_TYPE"),
            ("Authorization", "HTTP_AUTHORIZATION"),
        ):
            if value := environ.get(key):
                headers[name] = str(value)
        method = str(environ.get("REQUEST_METHOD", "POST"))
        return self._exchange(method, base + target, headers, body, whose)

    def _exchange(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None, whose: str
    ) -> Relayed | Refused:
        data = b""
        with watching(self._timeout) as watch:
            try:
                with self._session.request(
                    method,
                    url,
                    data=body,
                    headers=headers,
                    timeout=self._timeout,  # connecting, and each read; the watch the whole
                    stream=True,
                    allow_redirects=False,
                ) as response:
                    for chunk in response.iter_content(8192):
                        data += chunk
                        if len(data) > MAX_ANSWER:
                            break
                error: BaseException | None = None
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
                error = e
        if error is not None:
            # Cut off by the watchdog, the exchange ends in whatever a shut socket makes of it.
            timeouts = requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError
            if watch.cut is not None or isinstance(error, timeouts):
                problem = f"{whose}, which did not answer within {self._timeout:g}s at {url}"
                return _failed("504 Gateway Timeout", "timeout", problem)
            problem = f"{whose}, which cannot be reached at {url}: {describe(innermost(error))}"
            return _failed("502 Bad Gateway", "unavailable", problem)
        if len(data) > MAX_ANSWER:
            problem = f"{whose}, whose answer from {url} is over {MAX_ANSWER} bytes"
            return _failed("502 Bad Gateway", "unavailable", problem)
        relayed = tuple((n, response.headers[n]) for n in _RELAYED if n in response.headers)
        return Relayed(
            _status_line(response.status_code, response.reason),
            response.headers.get("Content-Type", TEXT),
            data,
            relayed,
        )


def _failed(status: str, kind: str, problem: str) -> Refused:
    log.warning("the shard that owns a message did not answer", extra={"err": problem})
    return Refused(status, kind, problem)


def _misdirected(problem: str) -> Refused:
    return Refused("421 Misdirected Request", "misdirected", problem)


def _status_line(code: int, reason: str | None) -> str:
    if not reason:
        try:
            reason = http.HTTPStatus(code).phrase
        except ValueError:
            reason = "Unknown"
    return f"{code} {reason}"
