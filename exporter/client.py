"""The one place that calls the Mail Partner API.

Requests share one ``requests.Session`` (keep-alive) and end in a ``MessageAggregate`` or a
``PollError`` whose ``label`` is the upstream code or the transport failure reason. Each is
bounded by ``api.timeout`` on the wall clock, from connect to the last body byte: a watchdog
thread shuts the socket of a request past its deadline, however slowly the upstream trickles;
``abort`` shuts them all at shutdown. The key travels in the query string, so every text
that leaves this module has been through the ``Redactor``.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions

from exporter.aggregate import MessageAggregate, ReportAggregator
from exporter.config.convert import describe
from exporter.config.model import ApiConfig
from exporter.deadline import ABORTED, Watch, WatchedAdapter, innermost, watching
from exporter.parse import (
    MAIL,
    Body,
    InvalidResponse,
    ReportShape,
    UpstreamError,
    error_code,
    parse_json,
    parse_xml,
)
from exporter.secret import Redactor
from exporter.stats import RequestStats

BULK_STATUS = "bulk-status"
ME = "me"
# Codes that concern one message; the API itself answered and took the key.
_MESSAGE_CODES = frozenset({"3", "4"})
_ERROR_BODY_LIMIT = 65536
# A JSON endpoint answers a few hundred bytes; more is refused, however well it compresses.
_JSON_LIMIT = 1 << 20
_CHUNK = 65536


class PollError(Exception):
    """A request that did not yield reports. ``label`` is its metric label value."""

    label: str
    # Seconds the upstream asked us to wait (Retry-After), if it said.
    retry_after: float | None = None

    @property
    def rate_limited(self) -> bool:
        return self.label == "429"


class ApiError(PollError):
    """Mail Partner answered with an error code (1, 3, 4, 10, 429, ...)."""

    def __init__(self, code: str, message: str = "") -> None:
        self.code = self.label = code
        self.message = message
        super().__init__(f"API error code {code}" + (f": {message}" if message else ""))


class TransportError(PollError):
    """No usable answer: ``timeout``, ``connection``, ``http_<status>``, ``invalid_response``."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = self.label = reason
        super().__init__(f"{reason}: {detail}")


class RequestAborted(BaseException):
    """The client was aborted (the exporter is stopping): the request was cut off unanswered.

    No failure of the upstream, so it is neither counted nor logged as one. Like
    ``asyncio.CancelledError`` it is a ``BaseException``: a poll's ``except Exception`` lets
    it through, and the poll ends as if it had never started.
    """


class MailPartnerClient:
    """Requests to one API. It mounts its own transport on ``session`` (which carries the
    headers and any proxy settings), so that every request it makes keeps its deadline."""

    def __init__(
        self,
        config: ApiConfig,
        session: requests.Session,
        stats: RequestStats,
        redact: Redactor,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._session = session
        self._stats = stats
        self._redact = redact
        self._clock = clock
        adapter = WatchedAdapter(pool_maxsize=config.concurrency)  # one connection per request
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        self._lock = threading.Lock()
        self._in_flight: set[Watch] = set()
        self._aborted = False

    @property
    def config(self) -> ApiConfig:
        return self._config

    @property
    def stats(self) -> RequestStats:
        return self._stats

    def abort(self) -> None:
        """Cut off every request in flight now, and refuse new ones: they all raise
        ``RequestAborted``. For shutdown, which must not wait on a slow upstream."""
        with self._lock:
            self._aborted = True
            in_flight = list(self._in_flight)
        for watch in in_flight:
            watch.cut_off(ABORTED)

    def bulk_status(
        self,
        message_id: str,
        aggregator: ReportAggregator,
        shape: ReportShape = MAIL,
        timeout: float | None = None,
    ) -> MessageAggregate:
        """Fetch one message's reports into ``aggregator``; raise ``PollError``.

        ``timeout`` shortens ``api.timeout`` for this request (a probe within a scrape).
        """
        parse = parse_xml if self._config.format == "xml" else parse_json
        params = {"messageId": message_id}
        if self._config.format == "xml":
            params["_format"] = "xml"
        self._request(BULK_STATUS, params, lambda body: parse(body, aggregator, shape), timeout)
        return aggregator.result()

    def get_json(self, endpoint: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """``GET base_url/endpoint`` as JSON: the answer's object, or ``PollError``.

        An answer with ``"success": false`` raises ``ApiError`` with its code, and is
        counted like bulk-status errors (``endpoint`` is the metric label: keep it fixed).
        A body over 1 MiB, decoded, is an ``invalid_response``.
        """
        documents: list[dict[str, Any]] = []

        def read(body: Body) -> None:
            # In chunks: the cap stops a gzip bomb before it is inflated.
            text = b"".join(iter(lambda: body.read(_CHUNK), b""))
            try:
                document = json.loads(text)
            except (ValueError, RecursionError):
                raise InvalidResponse("malformed JSON") from None
            if not isinstance(document, dict):
                raise InvalidResponse("body is not a JSON object")
            code = error_code(document.get("code"))
            if document.get("success") is False or code not in (None, "200"):
                message = document.get("message")
                raise UpstreamError(
                    code or "invalid",
                    message[:200] if isinstance(message, str) else "",
                )
            documents.append(document)

        self._request(endpoint, dict(params or {}), read, limit=_JSON_LIMIT)
        return documents[0]

    def _request(
        self,
        endpoint: str,
        params: dict[str, str],
        read: Callable[[Body], None],
        timeout: float | None = None,
        limit: int | None = None,
    ) -> None:
        timeout = self._config.timeout if timeout is None else min(timeout, self._config.timeout)
        cap = (
            self._config.max_response_bytes
            if limit is None
            else min(limit, self._config.max_response_bytes)
        )
        started = self._clock()
        with self._watched(timeout) as watch:
            self._stats.request_started(endpoint)
            error = self._exchange(endpoint, params, read, timeout=timeout, watch=watch, limit=cap)
        if watch.cut == ABORTED:
            raise RequestAborted(f"{endpoint}: cut off, the client was aborted")
        if watch.expired:  # whatever the shut socket made of the answer
            error = TransportError("timeout", f"no answer within {timeout:g}s")
        if error is None:
            self._stats.request_finished(endpoint, self._clock() - started, None, up=True)
            return
        self._stats.request_finished(
            endpoint,
            self._clock() - started,
            error.label,
            up=isinstance(error, ApiError) and error.code in _MESSAGE_CODES,
            api_error=isinstance(error, ApiError),
        )
        # ``from None``: the chained requests exception would carry the URL.
        raise error from None

    def _exchange(
        self,
        endpoint: str,
        params: dict[str, str],
        read: Callable[[Body], None],
        *,
        timeout: float,
        watch: Watch,
        limit: int,
    ) -> PollError | None:
        """One GET, its answer handed to ``read``: None, or the error it ended in."""
        key = self._config.api_key.reveal() if self._config.api_key else ""
        retry_after = None
        try:
            with self._session.get(
                f"{self._config.base_url}/{endpoint}",
                params={"apiKey": key, **params},
                timeout=timeout,  # connecting, and each read; the watch bounds the whole
                stream=True,
                allow_redirects=False,  # the API does not redirect: a 3xx is an http_3xx
            ) as response:
                retry_after = _seconds(response.headers.get("Retry-After"))
                response.raw.decode_content = True
                body = _BoundedReader(response.raw, watch, limit)
                _check_status(response.status_code, body)
                read(body)
        except UpstreamError as e:
            error: PollError = ApiError(e.code, self._redact(e.message))
        except InvalidResponse as e:
            error = TransportError("invalid_response", self._redact(str(e)))
        except PollError as e:  # raised here, from no upstream text
            error = e
        except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
            error = TransportError("timeout", f"no answer within {timeout:g}s")
        except (requests.ConnectionError, urllib3.exceptions.ProtocolError, OSError) as e:
            error = TransportError("connection", self._redact(_innermost(e)))
        except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as e:
            error = TransportError("invalid_response", self._redact(_innermost(e)))
        else:
            return None
        error.retry_after = retry_after
        return error

    @contextlib.contextmanager
    def _watched(self, timeout: float) -> Iterator[Watch]:
        """``deadline.watching``, and the request in flight for ``abort`` to cut off."""
        with watching(timeout) as watch:
            with self._lock:  # one step with abort(): a request is refused or cut off
                if self._aborted:
                    raise RequestAborted("refused: the client was aborted")
                self._in_flight.add(watch)
            try:
                yield watch
            finally:
                with self._lock:
                    self._in_flight.discard(watch)


def _check_status(status: int, body: Body) -> None:
    if status == 200:
        return
    if status == 429:
        raise ApiError("429", "rate limited (HTTP 429)")
    # Some gateways wrap API errors in a 4xx; take the code if the body says it.
    try:
        document = json.loads(body.read(_ERROR_BODY_LIMIT))
    except (ValueError, RecursionError):  # a hostile body may nest without end
        document = None
    if isinstance(document, dict) and document.get("success") is False and "code" in document:
        message = document.get("message")
        raise UpstreamError(
            error_code(document["code"]) or "invalid",
            message[:200] if isinstance(message, str) else "",
        )
    raise TransportError(f"http_{status}", f"HTTP {status}")


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent or odd."""
    if not retry_after:
        return None
    if retry_after.strip().isdigit():
        return float(retry_after.strip())
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo else None


def _innermost(error: BaseException) -> str:
    return describe(innermost(error))


class _BoundedReader:
    """A file-like view of the body that gives up past the deadline or the size cap.

    The watchdog ends a read blocked past the deadline; this reads no further after it. The
    cap counts decoded bytes, so a body sent without end, or a gzip bomb, stops there.
    """

    def __init__(self, raw: Body, watch: Watch, limit: int) -> None:
        self._raw = raw
        self._watch = watch
        self._left = limit
        self._limit = limit

    def read(self, size: int = -1) -> bytes:
        if self._watch.expired:
            raise TransportError("timeout", "the response body did not finish in time")
        # One byte more than allowed tells a body at the limit from one past it.
        want = self._left + 1 if size < 0 else min(size, self._left + 1)
        chunk = self._raw.read(want)
        self._left -= len(chunk)
        if self._left < 0:
            raise InvalidResponse(f"response body larger than {self._limit} bytes")
        return chunk
