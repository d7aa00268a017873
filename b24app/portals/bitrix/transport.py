"""The wire under every Bitrix24 exchange: a deadline and a size cap, sessions, exchange logs.

``requests`` has a connect and a read timeout, and the read timeout applies to each read: a
server that sends one byte every few seconds keeps a caller for as long as it likes. Every
exchange (REST and OAuth) therefore runs under a wall-clock deadline: a watchdog thread shuts
down the sockets the exchange uses when it passes, which ends a blocked connect, send or read at
once, and the exchange fails with DEADLINE_EXCEEDED. The answer is streamed and refused beyond
``max_body_bytes`` (RESPONSE_TOO_LARGE), its connection closed rather than drained.
"""

from __future__ import annotations

import heapq
import http.cookiejar
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from requests.utils import get_environ_proxies

from b24app import metrics
from b24app.portals.bitrix.config import BitrixConfig
from b24app.portals.bitrix.errors import BitrixError, BitrixUnavailable
from b24app.portals.bitrix.netguard import GuardedAdapter

__all__ = ["BitrixSession", "build_session"]

logger = logging.getLogger("b24app.bitrix")


class _DeadlineExceeded(requests.Timeout):
    """The exchange did not finish within the deadline; its connection was shut down."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no complete answer within {seconds:g}s")
        self.seconds = seconds


class _ResponseTooLarge(requests.RequestException):
    """The answer is longer than the cap; its connection was closed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer longer than {limit} bytes")
        self.limit = limit


DEADLINE_SLACK_S = 0.05
"""A timeout that fires this close to the deadline counts as the deadline."""


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Deadline:
    """One exchange's wall-clock limit and the sockets it used (shut down when it passes)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self.expired = False
        self.cancelled = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def remaining(self) -> float:
        return self.expires - time.monotonic()

    def passed(self) -> bool:
        """Expired, or so nearly that a timeout cut to what was left has just fired."""
        return self.expired or self.remaining() < DEADLINE_SLACK_S

    def timeout(self, config: BitrixConfig) -> tuple[float, float]:
        """``(connect, read)`` for ``requests``: the configured ones, within what is left."""
        left = max(0.01, self.remaining())
        return (min(config.connect_timeout, left), min(config.read_timeout, left))

    def attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if not self.expired:
                if all(known is not sock for known in self._sockets):
                    self._sockets.append(sock)
                return
        _shutdown(sock)

    def expire(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shutdown(sock)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._sockets = []


class _Watchdog:
    """One daemon thread per process that expires the deadlines that pass."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked worker starts its own

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: _Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.expires, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="b24-deadline-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        deadline = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(delay)
            deadline.expire()


_watchdog = _Watchdog()
_exchange_state = threading.local()


def _attach_to_deadline(sock: socket.socket | None) -> None:
    deadline = getattr(_exchange_state, "deadline", None)
    if deadline is not None:
        deadline.attach(sock)


class _DeadlineConnectionMixin:
    """Hands every socket a request is sent on to the current exchange's deadline."""

    sock: socket.socket | None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _attach_to_deadline(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach_to_deadline(self.sock)  # a kept-alive connection; a new one attaches on connect
        super().request(*args, **kwargs)  # type: ignore[misc]


_deadline_pools: dict[type, type] = {}


def _with_deadline(pool_class: type) -> type:
    if pool_class not in _deadline_pools:
        connection_class = type(
            f"Deadline{pool_class.ConnectionCls.__name__}",
            (_DeadlineConnectionMixin, pool_class.ConnectionCls),
            {},
        )
        _deadline_pools[pool_class] = type(
            f"Deadline{pool_class.__name__}", (pool_class,), {"ConnectionCls": connection_class}
        )
    return _deadline_pools[pool_class]


class _DeadlineAdapterMixin:
    """Pools whose connections report their sockets to the exchange's deadline."""

    poolmanager: Any

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)  # type: ignore[misc]
        self.poolmanager.pool_classes_by_scheme = {
            scheme: _with_deadline(pool_class)
            for scheme, pool_class in self.poolmanager.pool_classes_by_scheme.items()
        }


class _DeadlineAdapter(_DeadlineAdapterMixin, HTTPAdapter):
    pass


class _GuardedDeadlineAdapter(_DeadlineAdapterMixin, GuardedAdapter):
    pass


def _read_capped(response: requests.Response, limit: int) -> None:
    """Read the streamed answer into ``response.content``, refusing more than ``limit`` bytes
    (after decompression); a refused answer's connection is closed, not drained."""
    declared = response.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        response.close()
        raise _ResponseTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > limit:
            response.close()
            raise _ResponseTooLarge(limit)
        chunks.append(chunk)
    response._content = b"".join(chunks)


def _bounded_request(
    send: Callable[..., requests.Response], config: BitrixConfig
) -> requests.Response:
    """``send(timeout=…, stream=True)`` and read the whole answer, within ``config.deadline``
    and ``config.max_body_bytes``. Raises ``requests`` exceptions (:class:`_DeadlineExceeded`
    and :class:`_ResponseTooLarge` among them) for :func:`_transport_error`."""
    deadline = _Deadline(config.deadline)
    outer = getattr(_exchange_state, "deadline", None)
    _exchange_state.deadline = deadline
    _watchdog.arm(deadline)
    try:
        try:
            response = send(timeout=deadline.timeout(config), stream=True)
            _read_capped(response, config.max_body_bytes)
        except Exception as exc:
            # A socket shut under a read surfaces as whatever the layer reading it makes of an
            # early end (a protocol error, a reset, an SSL error): the deadline is the cause.
            # A read timeout cut to what was left of the deadline is the deadline too.
            if deadline.passed() and not isinstance(exc, _ResponseTooLarge | BitrixError):
                raise _DeadlineExceeded(config.deadline) from None
            if isinstance(exc, requests.RequestException) or not isinstance(exc, OSError):
                raise
            raise requests.ConnectionError(type(exc).__name__) from None
        if deadline.expired:  # an answer without a length, cut short by the shutdown
            response.close()
            raise _DeadlineExceeded(config.deadline)
        return response
    finally:
        deadline.cancel()
        _exchange_state.deadline = outer


class _NoAuth(AuthBase):
    """Requests to Bitrix24 carry their token themselves: never ``~/.netrc``'s credentials
    (which ``requests`` would look for, two ``stat`` calls per request)."""

    def __call__(self, request):
        return request


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Bitrix24 calls carry their token in the body and need no cookie. One session serves every
    portal, so a cookie any portal (or anyone answering as one) sets is neither kept, where
    thousands of portals' cookies would pile up, nor sent anywhere again."""

    def set_ok(self, cookie, request) -> bool:
        return False

    def return_ok(self, cookie, request) -> bool:
        return False


class BitrixSession(requests.Session):
    """``requests.Session`` that reads the environment's proxy settings (``HTTPS_PROXY``,
    ``NO_PROXY``, ...) once per origin and process, not on every request (``requests`` walks
    the whole environment twice per request for them), keeps no cookie (:class:`_NoCookies`),
    and sends a JSON POST without the generic request merging (:meth:`post_json`)."""

    ENVIRON_ORIGINS = 4096

    def __init__(self) -> None:
        super().__init__()
        self.auth = _NoAuth()
        self.cookies.set_policy(_NoCookies())
        self._environ_proxies: dict[tuple[str, str, str | None], dict[str, str]] = {}

    def post_json(
        self, url: str, payload: Any, *, headers: dict[str, str], **send: Any
    ) -> requests.Response:
        """``post(url, json=payload, headers=headers, allow_redirects=False, **send)``, the
        request prepared directly: this session has no auth, cookies, hooks or parameters to
        merge into it, and ``Session.request``'s merging of them costs about as much as the
        rest of the client's work on a call."""
        prepared = requests.PreparedRequest()
        prepared.prepare(method="POST", url=url, headers={**self.headers, **headers}, json=payload)
        settings = self.merge_environment_settings(
            prepared.url, {}, send.pop("stream", None), None, None
        )
        return self.send(prepared, allow_redirects=False, **settings, **send)

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        if not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        no_proxy = proxies.get("no_proxy") if proxies is not None else None
        scheme, _, rest = url.partition("://")
        key = (scheme, rest.split("/", 1)[0], no_proxy)
        found = self._environ_proxies.get(key)
        if found is None:
            found = get_environ_proxies(url, no_proxy=no_proxy)
            if len(self._environ_proxies) >= self.ENVIRON_ORIGINS:
                self._environ_proxies.clear()
            self._environ_proxies[key] = found
        proxies = {} if proxies is None else proxies
        for name, value in found.items():
            proxies.setdefault(name, value)
        if verify is True or verify is None:
            verify = (
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or verify
            )
        return {
            "proxies": requests.sessions.merge_setting(proxies, self.proxies),
            "stream": requests.sessions.merge_setting(stream, self.stream),
            "verify": requests.sessions.merge_setting(verify, self.verify),
            "cert": requests.sessions.merge_setting(cert, self.cert),
        }


def build_session(config: BitrixConfig, *, pool_maxsize: int = 32) -> BitrixSession:
    """A ``requests.Session`` for Bitrix24; share one per process.

    Unless ``allow_private`` is on, every connection's peer address is checked when it connects
    (:class:`~b24app.portals.bitrix.netguard.GuardedAdapter`). Retries are left to the callers. Its
    connections report to the deadline of the exchange that uses them (:func:`_bounded_request`).
    """
    session = BitrixSession()
    adapter_class = _DeadlineAdapter if config.allow_private else _GuardedDeadlineAdapter
    for prefix in ("https://", "http://"):
        session.mount(prefix, adapter_class(pool_connections=16, pool_maxsize=pool_maxsize))
    session.headers["User-Agent"] = config.user_agent
    return session


def _json_body(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _transport_error(exc: requests.RequestException, host: str) -> BitrixError:
    name = type(exc).__name__
    if isinstance(exc, _ResponseTooLarge):
        return BitrixUnavailable(
            "RESPONSE_TOO_LARGE", f"{host} answered more than {exc.limit} bytes; connection closed"
        )
    if isinstance(exc, _DeadlineExceeded):
        return BitrixUnavailable(
            "DEADLINE_EXCEEDED",
            f"no complete answer from {host} within {exc.seconds:g}s; connection closed",
        )
    if isinstance(exc, requests.Timeout):
        return BitrixUnavailable("TIMEOUT", f"{name} talking to {host}")
    if isinstance(exc, requests.ConnectionError):
        return BitrixUnavailable("CONNECTION_ERROR", f"{name} talking to {host}")
    if isinstance(exc, requests.TooManyRedirects):
        return BitrixError("UNEXPECTED_REDIRECT", f"{host} answered with a redirect")
    return BitrixError("REQUEST_FAILED", f"{name} talking to {host}")


SLOW_CALL_S = 1.0
"""A call that took (or waited for the rate limit) this long is logged at INFO even when it
succeeded; quick successes are logged at DEBUG, so a busy screen does not write a line per call."""


def _log_exchange(
    method: str,
    api: str,
    host: str,
    *,
    status: int | None,
    started: float,
    error: str | None,
    waited: float = 0.0,
    http: str = "POST",
) -> None:
    duration = time.monotonic() - started
    metrics.rest_call(method, api, duration, error)
    noteworthy = error is not None or duration >= SLOW_CALL_S or waited >= SLOW_CALL_S
    logger.log(
        logging.INFO if noteworthy else logging.DEBUG,
        "bitrix24 call method=%s api=%s host=%s status=%s duration_ms=%d wait_ms=%d error=%s"
        " http=%s",
        method,
        api,
        host,
        status if status is not None else "-",
        duration * 1000,
        waited * 1000,
        error or "-",
        http,
    )
