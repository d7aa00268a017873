"""The only module that speaks HTTP to Bitrix24: REST client, OAuth server, typed errors.

Nothing here touches the database. Tokens, the "token expired" refresh and the "portal moved"
update are passed in by the services layer, which owns storage and locking::

    config = BitrixConfig(client_id=..., client_secret=..., oauth_servers=(...,))
    session = build_session(config)                      # one per process
    client = BitrixClient(
        account.client_endpoint, account.access_token, config=config, session=session,
        on_expired=lambda: account_tokens_refresh(account_id=...),   # returns the new token
        on_domain_change=lambda endpoint: portal_endpoint_update(...),
        limiter=limiter, limiter_key=portal.member_id, rate=portal.rate_limit,
    )
    item = client.call_v3("tasks.task.result.add", {"fields": {"taskId": 51, "text": "Done"}},
                          idempotency_key=change.key)["item"]

Errors are all :class:`BitrixError` subclasses chosen by error code and HTTP status (never by
message text, which is localised). Tokens and the client secret never appear in log records,
error messages or reprs, nor in URLs, save one case: a token request to an OAuth server that
reads no POST body goes by GET with a query string (see :class:`OAuthServer`); it is masked in
every log record. Protocol references (§) point to ``bitrix24-protocol.md``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from oauthlib.oauth2 import InsecureTransportError, OAuth2Error
from requests.adapters import HTTPAdapter
from requests_oauthlib import OAuth2Session

from b24app.logs import SecretMaskingFilter
from b24app.masking import mask_secret
from b24app.masking import redact as _redact
from b24app.portals.breaker import (
    BreakerOpen,
    CircuitBreaker,
    InflightLimiter,
    InflightTimeout,
)
from b24app.portals.netguard import (
    BitrixError,
    GuardedAdapter,
    UnsafeURL,
    check_base_url,
    client_endpoint_for,
    parse_origin,
)
from b24app.portals.ratelimit import RateLimiter, RateLimitTimeout

__all__ = [
    "ACCESS_DENIED_CODES",
    "AUTH_ERROR_CODES",
    "DEFAULT_OAUTH_SERVERS",
    "IDEMPOTENCY_KEY_REUSED",
    "TOKEN_EXPIRED_CODES",
    "UNAVAILABLE_CODES",
    "VALIDATION_CODES",
    "WRITE_SUFFIXES",
    "BitrixAccessDenied",
    "BitrixAuthError",
    "BitrixClient",
    "BitrixConfig",
    "BitrixError",
    "BitrixTokenExpired",
    "BitrixUnavailable",
    "BitrixValidationError",
    "OAuthServer",
    "TokenMethod",
    "TokenSet",
    "UnsafeURL",
    "V3Listing",
    "build_session",
    "mask_secret",
    "oauth_origin_for",
]

logger = logging.getLogger("b24app.bitrix")

DEFAULT_OAUTH_SERVERS = ("https://oauth.bitrix.info", "https://oauth.bitrix24.tech")
V3_PREFIX = "BITRIX_REST_V3_EXCEPTION_"
IDEMPOTENCY_KEY_REUSED = V3_PREFIX + "IDEMPOTENCYKEYREUSEDEXCEPTION"
"""422: the key was used with another body (§5.2) — which may be ours with a refreshed `auth`."""

# --- errors ------------------------------------------------------------------------------------


class BitrixUnavailable(BitrixError):
    """Bitrix24 cannot serve the request now; retry later (after ``retry_after`` seconds if set).

    ``operating_reset_at`` (Unix seconds) is set for ``OPERATION_TIME_LIMIT`` when known: the
    method is blocked for this app until then (§7.2).
    """

    def __init__(
        self,
        code: str,
        description: str = "",
        *,
        status: int | None = None,
        retry_after: float | None = None,
        operating_reset_at: int | None = None,
    ) -> None:
        super().__init__(code, description, status=status)
        self.retry_after = retry_after
        self.operating_reset_at = operating_reset_at


class BitrixAuthError(BitrixError):
    """The connection is dead (revoked, unpaid, uninstalled, bad refresh token): re-authorise."""


class BitrixTokenExpired(BitrixError):
    """The access token expired (``expired_token``/``invalid_token``) and no refresh was tried."""


class BitrixAccessDenied(BitrixError):
    """The token works but this user or app may not do this (rights, scope, auth type)."""


class BitrixValidationError(BitrixError):
    """Bitrix24 refused the request's content; ``validation`` lists ``{"field", "message"}``."""

    def __init__(
        self,
        code: str,
        description: str = "",
        *,
        status: int | None = None,
        validation: Iterable[Mapping[str, str | None]] = (),
    ) -> None:
        super().__init__(code, description, status=status)
        self.validation: list[dict[str, str | None]] = [
            {"field": entry.get("field"), "message": entry.get("message") or ""}
            for entry in validation
        ]

    def __str__(self) -> str:
        details = "; ".join(
            f"{entry['field']}: {entry['message']}" if entry["field"] else str(entry["message"])
            for entry in self.validation
        )
        return f"{super().__str__()} [{details}]" if details else super().__str__()


TOKEN_EXPIRED_CODES = frozenset({"expired_token", "invalid_token"})
"""Refresh the access token and repeat the call once (§2.3, §6.2)."""

AUTH_ERROR_CODES = frozenset(
    {
        "invalid_grant",
        "bad_verification_code",
        "invalid_client",
        "wrong_client",
        "NO_AUTH_FOUND",
        "PAYMENT_REQUIRED",
        "PORTAL_DELETED",
        "NOT_INSTALLED",
        "APPLICATION_NOT_FOUND",
        "ERROR_OAUTH",
        "authorization_error",
    }
)
"""The connection is dead; a refresh does not help (§2.5, §6)."""

ACCESS_DENIED_CODES = frozenset(
    {
        "ACCESS_DENIED",
        "ACCESS_ERROR",
        "ALLOWED_ONLY_INTRANET_USER",
        "INVALID_CREDENTIALS",
        "INVALID_SCOPE",
        "invalid_scope",
        "insufficient_scope",
        "METHOD_CONFIRM_DENIED",
        "METHOD_CONFIRM_WAITING",
        "user_access_error",
        "WRONG_AUTH_TYPE",
        V3_PREFIX + "ACCESSDENIEDEXCEPTION",
        V3_PREFIX + "INSUFFICIENTSCOPEEXCEPTION",
    }
)

UNAVAILABLE_CODES = frozenset(
    {
        "QUERY_LIMIT_EXCEEDED",
        "OPERATION_TIME_LIMIT",
        "OVERLOAD_LIMIT",
        "INTERNAL_SERVER_ERROR",
        "ERROR_UNEXPECTED_ANSWER",
    }
)

VALIDATION_CODES = frozenset(
    {
        "ERROR_ARGUMENT",
        "INVALID_ARG_VALUE",
        "ERROR_BATCH_LENGTH_EXCEEDED",
        "100",  # classic "Invalid value … Should be value of type int" (§5.4)
        V3_PREFIX + "UNKNOWNDTOPROPERTYEXCEPTION",
        V3_PREFIX + "UNKNOWNFILTEROPERATOREXCEPTION",
        V3_PREFIX + "ENTITYNOTFOUNDEXCEPTION",
        IDEMPOTENCY_KEY_REUSED,
    }
)
"""Plus every v3 ``…_VALIDATION_…`` and ``…_INVALID…EXCEPTION`` code (see ``_error_class``)."""


def _error_class(code: str, status: int | None) -> type[BitrixError]:
    if code in TOKEN_EXPIRED_CODES:
        return BitrixTokenExpired
    if code in AUTH_ERROR_CODES:
        return BitrixAuthError
    if code in ACCESS_DENIED_CODES:
        return BitrixAccessDenied
    if code in UNAVAILABLE_CODES:
        return BitrixUnavailable
    if code in VALIDATION_CODES:
        return BitrixValidationError
    if code.startswith(V3_PREFIX):
        name = code.removeprefix(V3_PREFIX)
        if name.startswith("VALIDATION_") or (
            name.startswith("INVALID") and name.endswith("EXCEPTION")
        ):
            return BitrixValidationError
    if status is not None:
        if status >= 500 or status == 429:
            return BitrixUnavailable
        if status == 401:
            return BitrixAuthError
        if status == 403:
            return BitrixAccessDenied
    return BitrixError


@dataclass(frozen=True)
class _ErrorInfo:
    """An error response reduced to what the typed exceptions carry."""

    code: str
    status: int
    from_body: bool
    """``code`` came from the response body (otherwise it is ours, e.g. ``HTTP_502``)."""
    description: str = ""
    validation: tuple[dict[str, str | None], ...] = ()
    time: Mapping[str, Any] | None = None
    retry_after: float | None = None

    @classmethod
    def from_response(
        cls, response: requests.Response, body: Any, secrets: Iterable[str]
    ) -> _ErrorInfo | None:
        """``None`` for a success; both error shapes of §5.2 / §6 otherwise.

        A JSON ``error`` key is an error whatever the status (``wrong_client`` comes with 200).
        """
        status = response.status_code
        secrets = tuple(secrets)
        retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
        if not isinstance(body, dict):
            if 300 <= status < 400:
                code = "UNEXPECTED_REDIRECT"
            else:
                code = "INVALID_RESPONSE" if status < 300 else f"HTTP_{status}"
            return cls(code, status, from_body=False, retry_after=retry_after)
        error = body.get("error")
        if error in (None, ""):
            if status < 300:
                return None
            return cls(f"HTTP_{status}", status, from_body=False, retry_after=retry_after)
        if isinstance(error, dict):  # REST 3.0: {"error": {"code", "message", "validation"}}
            code = str(error.get("code") or "")
            description = str(error.get("message") or "")
            raw_validation = error.get("validation")
            entries = raw_validation if isinstance(raw_validation, list) else []
            validation = tuple(
                {
                    "field": None if entry.get("field") is None else str(entry["field"]),
                    "message": _redact(str(entry.get("message") or ""), secrets),
                }
                for entry in entries
                if isinstance(entry, dict)
            )
        else:  # classic: {"error": "CODE", "error_description": "...", ["argument": "..."]}
            code = str(error)
            description = str(body.get("error_description") or "")
            argument = body.get("argument")
            validation = (
                ({"field": str(argument), "message": _redact(description, secrets)},)
                if argument
                else ()
            )
        return cls(
            code or f"HTTP_{status}",
            status,
            from_body=bool(code),
            description=_redact(description, secrets),
            validation=validation,
            time=_time_block(body),
            retry_after=retry_after,
        )

    def exception(self, *, operating_reset_at: int | None = None) -> BitrixError:
        """The typed exception for this error."""
        if self.from_body:
            error_class = _error_class(self.code, self.status)
        elif self.status >= 500 or self.status == 429:
            error_class = BitrixUnavailable
        else:  # no error code: the status alone does not say what went wrong
            error_class = BitrixError
        if error_class is BitrixUnavailable:
            retry_after = self.retry_after
            if retry_after is None and operating_reset_at is not None:
                retry_after = max(0.0, operating_reset_at - time.time())
            return BitrixUnavailable(
                self.code,
                self.description,
                status=self.status,
                retry_after=retry_after,
                operating_reset_at=operating_reset_at,
            )
        if error_class is BitrixValidationError:
            return BitrixValidationError(
                self.code, self.description, status=self.status, validation=self.validation
            )
        return error_class(self.code, self.description, status=self.status)


def _time_block(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    block = body.get("time")
    return block if isinstance(block, dict) else None


def _retry_after_seconds(header: str | None) -> float | None:
    if not header:
        return None
    try:
        seconds = float(header)
    except ValueError:
        try:
            moment = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        seconds = (moment - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _has_error_code(body: Any) -> bool:
    """Is this a Bitrix24 error body (either shape of §5.2 / §6)?"""
    return isinstance(body, dict) and body.get("error") not in (None, "")


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
    logger.info(
        "bitrix24 call method=%s api=%s host=%s status=%s duration_ms=%d wait_ms=%d error=%s"
        " http=%s",
        method,
        api,
        host,
        status if status is not None else "-",
        (time.monotonic() - started) * 1000,
        waited * 1000,
        error or "-",
        http,
    )


# --- configuration and tokens ------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class BitrixConfig:
    """App-wide settings of the Bitrix24 transport (from ``B24_*`` env vars, §contract).

    ``oauth_servers`` (``B24_OAUTH_SERVERS``) is normalised to bare origins; a comma-separated
    string is accepted. ``allow_private`` is ``B24_ALLOW_PRIVATE_PORTALS``.

    ``deadline`` (``B24_HTTP_DEADLINE``) bounds one exchange on the wall clock: connecting,
    sending and reading the whole answer. ``max_body_bytes`` (``B24_HTTP_MAX_BODY``) is the
    largest answer read; a longer one is refused and its connection closed.
    """

    client_id: str
    client_secret: str
    oauth_servers: tuple[str, ...] = DEFAULT_OAUTH_SERVERS
    allow_private: bool = False
    connect_timeout: float = 3.05
    read_timeout: float = 20.0
    user_agent: str = "b24-results/0.1"
    deadline: float = 25.0
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.deadline, int | float) and math.isfinite(self.deadline)):
            raise ValueError("deadline must be a number of seconds")
        if self.deadline <= 0:
            raise ValueError("deadline must be a positive number of seconds")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be a positive whole number of bytes")
        servers = self.oauth_servers
        if isinstance(servers, str):
            servers = tuple(part for part in servers.split(",") if part.strip())
        origins = tuple(
            _bare_origin(server.strip(), allow_http=self.allow_private, paths=("", "/"))
            for server in servers
        )
        object.__setattr__(self, "oauth_servers", origins)

    @property
    def timeout(self) -> tuple[float, float]:
        """``(connect, read)`` timeout for ``requests``."""
        return (self.connect_timeout, self.read_timeout)

    def __repr__(self) -> str:
        return (
            f"BitrixConfig(client_id={self.client_id!r}, "
            f"client_secret={mask_secret(self.client_secret)!r}, "
            f"oauth_servers={self.oauth_servers!r}, allow_private={self.allow_private!r}, "
            f"connect_timeout={self.connect_timeout!r}, read_timeout={self.read_timeout!r}, "
            f"user_agent={self.user_agent!r}, deadline={self.deadline!r}, "
            f"max_body_bytes={self.max_body_bytes!r})"
        )


TokenMethod = Literal["post", "get"]
"""How a request to the OAuth server's ``/oauth/token/`` travels: ``"post"``, the parameters in
an ``application/x-www-form-urlencoded`` body (tried first: no secret in a URL), or ``"get"``,
the parameters in the query string (as the docs' examples and two official SDKs send it)."""


@dataclass(frozen=True, repr=False)
class TokenSet:
    """Tokens and portal facts from a token response (§2.2) or an install payload (§1.4)."""

    access_token: str
    refresh_token: str
    expires_at: datetime
    """Aware UTC datetime when ``access_token`` expires."""
    scope: str
    """Comma-separated granted scopes."""
    member_id: str
    user_id: int | None
    client_endpoint: str
    server_endpoint: str
    status: str
    request_method: TokenMethod | None = None
    """How the token request that returned these tokens travelled: ``"post"`` (form body) or
    ``"get"`` (query string); ``None`` for tokens that did not come from the token endpoint
    (install payloads, frame POSTs). See :meth:`OAuthServer.token_method`."""

    @classmethod
    def from_response(cls, data: Mapping[str, Any]) -> TokenSet:
        """Build from a token response; ``expires`` wins over ``expires_in``."""
        access_token = data.get("access_token")
        refresh_token = data.get("refresh_token")
        if not access_token or not refresh_token:
            raise BitrixError("INVALID_TOKEN_RESPONSE", "token response lacks a token")
        try:
            if data.get("expires") not in (None, ""):
                expires_at = datetime.fromtimestamp(int(float(data["expires"])), UTC)
            else:
                lifetime = int(data.get("expires_in") or 3600)  # 1 hour per §2.4
                expires_at = datetime.now(UTC) + timedelta(seconds=lifetime)
            user_id = None if data.get("user_id") in (None, "") else int(data["user_id"])
        except (TypeError, ValueError, OverflowError) as exc:
            raise BitrixError(
                "INVALID_TOKEN_RESPONSE", "token response has a malformed expiry or user_id"
            ) from exc
        return cls(
            access_token=str(access_token),
            refresh_token=str(refresh_token),
            expires_at=expires_at,
            scope=_scope_text(data.get("scope")),
            member_id=str(data.get("member_id") or ""),
            user_id=user_id,
            client_endpoint=str(data.get("client_endpoint") or ""),
            server_endpoint=str(data.get("server_endpoint") or ""),
            status=str(data.get("status") or ""),
        )

    def __repr__(self) -> str:
        return (
            f"TokenSet(access_token={mask_secret(self.access_token)!r}, "
            f"refresh_token={mask_secret(self.refresh_token)!r}, "
            f"expires_at={self.expires_at.isoformat()!r}, scope={self.scope!r}, "
            f"member_id={self.member_id!r}, user_id={self.user_id!r}, "
            f"client_endpoint={self.client_endpoint!r}, "
            f"server_endpoint={self.server_endpoint!r}, status={self.status!r}, "
            f"request_method={self.request_method!r})"
        )


def _scope_text(value: Any) -> str:
    """Comma list of scopes from a string (commas and/or spaces, §1.4) or a list (oauthlib)."""
    if isinstance(value, list | tuple):
        value = ",".join(str(part) for part in value)
    return ",".join(part for part in re.split(r"[\s,]+", str(value or "")) if part)


def _bare_origin(url: str, *, allow_http: bool, paths: tuple[str, ...]) -> str:
    """Origin of ``url`` when its path is one of ``paths`` and it has no query."""
    origin = parse_origin(url, allow_http=allow_http)
    parts = urlsplit(url)
    if parts.path not in paths or parts.query:
        raise UnsafeURL("NOT_AN_ORIGIN", f"{url!r} is not an OAuth server origin")
    return str(origin)


# --- transport: a deadline and a size cap on every exchange -------------------------------------
#
# ``requests`` has a connect and a read timeout, and the read timeout applies to each read: a
# server that sends one byte every few seconds keeps a caller for as long as it likes. Every
# exchange (REST and OAuth) therefore runs under a wall-clock deadline: a watchdog thread shuts
# down the sockets the exchange uses when it passes, which ends a blocked connect, send or read at
# once, and the exchange fails with DEADLINE_EXCEEDED. The answer is streamed and refused beyond
# ``max_body_bytes`` (RESPONSE_TOO_LARGE), its connection closed rather than drained.


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


def build_session(config: BitrixConfig, *, pool_maxsize: int = 32) -> requests.Session:
    """A ``requests.Session`` for Bitrix24; share one per process.

    Unless ``allow_private`` is on, every connection's peer address is checked when it connects
    (:class:`~b24app.portals.netguard.GuardedAdapter`). Retries are left to the callers. Its
    connections report to the deadline of the exchange that uses them (:func:`_bounded_request`).
    """
    session = requests.Session()
    adapter_class = _DeadlineAdapter if config.allow_private else _GuardedDeadlineAdapter
    for prefix in ("https://", "http://"):
        session.mount(prefix, adapter_class(pool_connections=16, pool_maxsize=pool_maxsize))
    session.headers["User-Agent"] = config.user_agent
    return session


# --- OAuth server ------------------------------------------------------------------------------


def oauth_origin_for(server_endpoint: str, config: BitrixConfig) -> str:
    """The allow-listed OAuth server origin for a ``server_endpoint`` such as ``…/rest/``.

    The normalised origin must be exactly one of ``config.oauth_servers``; ``http`` only with
    ``allow_private``. Raises :class:`UnsafeURL` otherwise.
    """
    origin = _bare_origin(
        server_endpoint, allow_http=config.allow_private, paths=("", "/", "/rest", "/rest/")
    )
    if origin not in config.oauth_servers:
        raise UnsafeURL(
            "OAUTH_SERVER_NOT_ALLOWED", f"{origin} is not one of the allowed OAuth servers"
        )
    return origin


def _token_transport_error(
    method: str, host: str, exc: requests.RequestException, *, started: float, how: str
) -> BitrixError:
    """A token request that got no answer, logged. A GET's is raised by the caller outside its
    `except` block: requests' exception carries the URL, and a GET's URL the secrets."""
    failure = _transport_error(exc, host)
    _log_exchange(
        method, "oauth", host, status=None, started=started, error=failure.code, http=how.upper()
    )
    return failure


def _check_oauth_answer(
    method: str,
    host: str,
    response: requests.Response,
    body: Any,
    secrets: Iterable[str],
    started: float,
) -> None:
    """Log one OAuth-server exchange and raise its typed error, if it answered with one."""
    error = _ErrorInfo.from_response(response, body, secrets)
    _log_exchange(
        method,
        "oauth",
        host,
        status=response.status_code,
        started=started,
        error=error.code if error else None,
        http=response.request.method or "POST",
    )
    if error is not None:
        raise error.exception()


class _DropDebugRecords(logging.Filter):
    """requests-oauthlib logs token request bodies and token responses at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


_oauthlib_logger = logging.getLogger("requests_oauthlib.oauth2_session")
if not any(isinstance(f, _DropDebugRecords) for f in _oauthlib_logger.filters):
    _oauthlib_logger.addFilter(_DropDebugRecords())

# urllib3 puts request URLs in its records (the request line at DEBUG, retries and redirects at
# WARNING/INFO), and a token request sent by GET carries client_secret, refresh_token or code in
# its query. Mask them on these loggers themselves, before any handler sees the record: the
# stdout handler masks too, but not for handlers that run before it or without it (one on a
# urllib3 logger, an error tracker's logging hook).
_URL_LOGGERS = (
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.poolmanager",
    "urllib3.util.retry",
)
for _name in _URL_LOGGERS:
    _url_logger = logging.getLogger(_name)
    if not any(isinstance(f, SecretMaskingFilter) for f in _url_logger.filters):
        _url_logger.addFilter(SecretMaskingFilter())


class _TokenMethods:
    """Which way of sending a token request (:data:`TokenMethod`) each OAuth server origin was
    seen to read, for this process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._working: dict[str, TokenMethod] = {}
        self._wrong_client_tried: set[str] = set()

    def get(self, origin: str) -> TokenMethod | None:
        with self._lock:
            return self._working.get(origin)

    def learn(self, origin: str, method: TokenMethod) -> None:
        with self._lock:
            self._working[origin] = method

    def try_after_wrong_client(self, origin: str) -> bool:
        """True the first time only, per origin: see :meth:`OAuthServer._unread`."""
        with self._lock:
            if origin in self._wrong_client_tried:
                return False
            self._wrong_client_tried.add(origin)
            return True

    def clear(self) -> None:
        with self._lock:
            self._working.clear()
            self._wrong_client_tried.clear()


_token_methods = _TokenMethods()

_OTHER_METHOD: dict[TokenMethod, TokenMethod] = {"post": "get", "get": "post"}


class _OAuthTokenSession(OAuth2Session):
    """requests-oauthlib's session with every request under the transport's deadline and size
    cap (:func:`_bounded_request`), as the app's own requests are."""

    transport_config: BitrixConfig

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.pop("timeout", None)
        kwargs.pop("stream", None)
        parent = super().request
        return _bounded_request(
            lambda **transport: parent(method, url, *args, **kwargs, **transport),
            self.transport_config,
        )


class OAuthServer:
    """The Bitrix24 authorization server (§2): token exchange, refresh, trusted ``app.info``.

    Every method takes the OAuth server as stored for the portal (``server_endpoint`` or its
    origin) and talks only to it when it is allow-listed (:func:`oauth_origin_for`). Redirects
    are never followed.

    Token requests (:meth:`refresh`, :meth:`exchange_code`) go as a POST form first, so that no
    secret is in a URL. The docs and two official SDKs send them by GET with a query string, and
    whether every OAuth server reads a POST body is not known, so a request is sent once more the
    other way (the query string, or back to the body), only when the answer proves the server
    read none of its parameters (:meth:`_unread`): then it never saw the refresh token or code
    either, and sending it again cannot spend it twice. Any other answer, a timeout or a lost
    answer is raised as it is. The way that worked is remembered per origin for the process
    (:meth:`token_method`) and used first from then on; each returned :class:`TokenSet` says
    how it was fetched (``request_method``).
    """

    def __init__(self, config: BitrixConfig, session: requests.Session | None = None) -> None:
        self._config = config
        self._session = session if session is not None else build_session(config)

    def token_method(self, server_origin: str) -> TokenMethod | None:
        """How this process sends token requests to this OAuth server: the way of the last one
        that succeeded, ``None`` before any has (the first goes by POST)."""
        return _token_methods.get(oauth_origin_for(server_origin, self._config))

    @staticmethod
    def forget_token_methods() -> None:
        """Forget what :meth:`token_method` learnt, for every server (tests; a server change)."""
        _token_methods.clear()

    def refresh(self, server_origin: str, refresh_token: str) -> TokenSet:
        """Trade a refresh token for a new pair (§2.3). The old refresh token is spent."""
        origin = oauth_origin_for(server_origin, self._config)
        params = {
            "grant_type": "refresh_token",
            "client_id": self._config.client_id,
            "client_secret": self._config.client_secret,
            "refresh_token": refresh_token,
        }
        return self._token_request(
            origin,
            lambda how: self._send_form(
                f"{origin}/oauth/token/", "oauth.token", params, secrets=(refresh_token,), how=how
            ),
        )

    def exchange_code(self, server_origin: str, code: str) -> TokenSet:
        """Trade an authorization code (valid 30 s) for tokens (§2.2), via requests-oauthlib.

        For an ``http`` OAuth server (``allow_private`` testing only) oauthlib also needs
        ``OAUTHLIB_INSECURE_TRANSPORT=1`` in the environment.
        """
        origin = oauth_origin_for(server_origin, self._config)
        return self._token_request(origin, lambda how: self._fetch_token(origin, code, how))

    def app_info(self, server_origin: str, access_token: str) -> dict[str, Any]:
        """Trusted ``app.info`` on the OAuth server (§2.7): ``client_id``, ``install{…}``, …"""
        origin = oauth_origin_for(server_origin, self._config)
        body = self._send_form(
            f"{origin}/rest/app.info", "app.info", {"auth": access_token}, secrets=(access_token,)
        )
        result = body.get("result")
        if not isinstance(result, dict):
            raise BitrixError("INVALID_RESPONSE", "app.info returned no result object")
        return result

    def authorize_url(self, portal_base_url: str, state: str) -> str:
        """Where to send the browser to start the code flow (§2.2, no ``redirect_uri``)."""
        origin = check_base_url(portal_base_url, allow_private=self._config.allow_private)
        query = urlencode({"client_id": self._config.client_id, "state": state})
        return f"{origin}/oauth/authorize/?{query}"

    # -- internals --

    def _token_request(
        self, origin: str, send: Callable[[TokenMethod], Mapping[str, Any]]
    ) -> TokenSet:
        """``send`` the token request the way that works for ``origin`` (POST until one is
        known), the other way once more if the answer proves it was not read."""
        known = _token_methods.get(origin)
        how: TokenMethod = known or "post"
        try:
            answer = send(how)
        except BitrixError as exc:
            if not self._unread(exc, origin, known):
                raise
            tried, how = how, _OTHER_METHOD[how]
            logger.warning(
                "bitrix24 oauth.token host=%s read no parameter of the %s request (error=%s); "
                "sending it by %s",
                urlsplit(origin).netloc,
                tried.upper(),
                exc.code,
                how.upper(),
            )
            answer = send(how)
        tokens = TokenSet.from_response(answer)
        _token_methods.learn(origin, how)
        return replace(tokens, request_method=how)

    @staticmethod
    def _unread(exc: BitrixError, origin: str, known: TokenMethod | None) -> bool:
        """Does this answer prove the server read none of the request's parameters?

        * HTTP 405: the server refused the HTTP method before reading anything.
        * ``invalid_request``: "a required parameter is missing" (``No "client_id" parameter
          found``). Every token request carries all of them, so the server did not read where
          they were. It is decided by the code, not the localised text; an ``invalid_request``
          for any other reason is a refusal before any grant, so nothing was spent either.
        * ``wrong_client``, while no way is known for this server: a server that read no
          ``client_id`` may call the empty one unknown. It identified no app, so it spent
          nothing; but a really wrong ``B24_CLIENT_ID`` answers the same, so this is tried once
          per server and process, which keeps such a deployment from sending the secret in a
          URL on every refresh. Once a way is known, ``wrong_client`` is about the client id.

        Anything else (``invalid_grant``, ``invalid_client``, 5xx, timeouts, a lost answer) may
        come from a server that read the request, and the refresh token may be spent: never
        sent again.
        """
        if isinstance(exc, UnsafeURL) or exc.status is None:
            return False
        if exc.status == 405 or exc.code == "invalid_request":
            return True
        return (
            exc.code == "wrong_client"
            and known is None
            and _token_methods.try_after_wrong_client(origin)
        )

    def _fetch_token(self, origin: str, code: str, how: TokenMethod) -> Mapping[str, Any]:
        """The authorization-code request through requests-oauthlib's ``fetch_token``."""
        host = urlsplit(origin).netloc
        secrets = (code, self._config.client_secret)
        oauth = _OAuthTokenSession(self._config.client_id)
        oauth.transport_config = self._config
        # Reuse the shared session's (guarded) adapters; the shared session owns and closes them.
        for prefix, adapter in self._session.adapters.items():
            oauth.mount(prefix, adapter)
        oauth.max_redirects = 0
        started = time.monotonic()

        def check_response(response: requests.Response) -> requests.Response:
            _check_oauth_answer(
                "oauth.token", host, response, _json_body(response), secrets, started
            )
            return response

        oauth.register_compliance_hook("access_token_response", check_response)
        headers = {"Accept": "application/json", "User-Agent": self._config.user_agent}
        if how == "post":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        failure: BitrixError
        try:
            return oauth.fetch_token(
                f"{origin}/oauth/token/",
                code=code,
                client_secret=self._config.client_secret,
                include_client_id=True,
                method=how.upper(),
                headers=headers,
            )
        except requests.RequestException as exc:
            failure = _token_transport_error("oauth.token", host, exc, started=started, how=how)
            if how == "post":
                raise failure from exc
        except InsecureTransportError as exc:
            raise UnsafeURL(
                "INSECURE_TRANSPORT",
                "oauthlib refuses http; set OAUTHLIB_INSECURE_TRANSPORT=1 for local testing",
            ) from exc
        except OAuth2Error as exc:
            raise BitrixError(
                "INVALID_TOKEN_RESPONSE", _redact(str(exc.description or exc.error), secrets)
            ) from exc
        # A GET's URL carries the secrets and requests' exceptions carry the URL: raise outside
        # the except block, so the error is not chained to it (not even as __context__).
        raise failure

    def _send_form(
        self,
        url: str,
        method: str,
        data: Mapping[str, str],
        *,
        secrets: Iterable[str],
        how: TokenMethod = "post",
    ) -> dict[str, Any]:
        """Send a form to the OAuth server, as a POST body or (``how="get"``) a query string;
        returns the JSON object or raises the typed error."""
        host = urlsplit(url).netloc
        secrets = (*secrets, self._config.client_secret)
        headers = {"Accept": "application/json", "User-Agent": self._config.user_agent}
        started = time.monotonic()
        failure: BitrixError
        fields = {"params" if how == "get" else "data": dict(data)}
        try:
            response = _bounded_request(
                lambda **transport: self._session.request(
                    how.upper(), url, **fields, headers=headers, allow_redirects=False, **transport
                ),
                self._config,
            )
        except requests.RequestException as exc:
            failure = _token_transport_error(method, host, exc, started=started, how=how)
            if how == "post":
                raise failure from exc
        else:
            body = _json_body(response)
            _check_oauth_answer(method, host, response, body, secrets, started)
            return body
        # As in _fetch_token: a GET's URL (in requests' exception) must not ride along.
        raise failure


# --- REST client -------------------------------------------------------------------------------

Api = Literal["classic", "v3"]

WRITE_SUFFIXES = (".add", ".update", ".delete", ".addfromchatmessage")
"""v3 methods whose name ends like this always carry an ``Idempotency-Key`` (§5.2)."""

QUERY_LIMIT_PENALTY_SHARE = 0.5
"""After ``QUERY_LIMIT_EXCEEDED`` (and no ``Retry-After``) pause the portal for the time its
bucket needs to drain this share of the burst (25 s × 0.5 for 50/2), at least 1 s."""

INFLIGHT_TTL_MARGIN_S = 5.0
"""An in-flight slot lives this much longer than the deadline of the request that holds it."""

MAX_LIST_ITEMS = 5000
"""Most items one listing reads, whatever a portal answers (a task has far fewer results)."""

_METHOD_NAME = re.compile(r"^[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")


@dataclass(frozen=True)
class V3Listing:
    """The items of a v3 list method, and what the listing learnt of the portal's page size."""

    items: list[Any]
    largest_page: int
    """The most items the portal returned in one page (at least the ``known_page`` passed)."""


def _item_key(item: Any) -> Any:
    """What tells list items apart: their ``id``, else the item itself."""
    if isinstance(item, dict) and "id" in item:
        return ("id", str(item["id"]))
    return ("item", repr(item))


class BitrixClient:
    """REST calls to one portal with one user's access token (§5).

    Not thread-safe: it updates its token, endpoint and ``last_time``; make one per task/request.

    * ``on_expired()`` is the caller's locked refresh; it returns the new access token. On
      ``expired_token``/``invalid_token`` the client calls it and repeats the request once,
      unchanged. Without it :class:`BitrixTokenExpired` is raised.
    * A portal that answers with a redirect to a new (checked) host gets the request sent there
      once more, for that one call: the client stays on its own endpoint, since anyone who runs
      a portal can answer a redirect to anywhere. ``on_domain_change(new_client_endpoint,
      access_token)`` is then called, after the call succeeded there, for the caller to confirm
      the move (with the OAuth server) before it remembers it.
    * ``limiter``/``limiter_key`` (the portal's ``member_id``)/``rate`` (burst, per second) pace
      every request; ``limiter_max_wait`` bounds the wait for a slot (``None``: wait as long as
      it takes), beyond it :class:`BitrixUnavailable` ``RATE_LIMITED`` is raised.
    * ``breaker`` (a :class:`~b24app.portals.breaker.CircuitBreaker`, keyed by the portal's
      host) fails calls to a host that keeps failing at once with :class:`BitrixUnavailable`
      ``PORTAL_UNREACHABLE`` (``retry_after``: the rest of its cool-down), before any wait.
    * ``inflight`` caps the requests in flight to the portal (``limiter_key``) at
      ``max_inflight``; a caller that gets no slot within ``limiter_max_wait`` (without one:
      the deadline) gets :class:`BitrixUnavailable` ``PORTAL_BUSY``.
    """

    def __init__(
        self,
        client_endpoint: str,
        access_token: str,
        *,
        config: BitrixConfig,
        on_expired: Callable[[], str] | None = None,
        on_domain_change: Callable[[str, str], None] | None = None,
        limiter: RateLimiter | None = None,
        limiter_key: str | None = None,
        rate: tuple[int, float] = (50, 2.0),
        limiter_max_wait: float | None = 30.0,
        session: requests.Session | None = None,
        breaker: CircuitBreaker | None = None,
        inflight: InflightLimiter | None = None,
        max_inflight: int = 10,
    ) -> None:
        self._config = config
        self._origin = check_base_url(client_endpoint, allow_private=config.allow_private)
        self._access_token = access_token
        self._on_expired = on_expired
        self._on_domain_change = on_domain_change
        self._limiter = limiter
        self._limiter_key = limiter_key or urlsplit(self._origin).netloc
        self._burst, self._rate = rate
        self._limiter_max_wait = limiter_max_wait
        self._session = session if session is not None else build_session(config)
        self._breaker = breaker
        self._inflight = inflight
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self._max_inflight = max_inflight
        self._operating_reset_at: dict[str, int] = {}
        self.last_time: Mapping[str, Any] | None = None
        """The ``time`` block of the last successful response (§6.3)."""

    @property
    def client_endpoint(self) -> str:
        """Current portal REST root (changes after a domain change)."""
        return client_endpoint_for(self._origin)

    def __repr__(self) -> str:
        return f"BitrixClient({self.client_endpoint!r}, {mask_secret(self._access_token)!r})"

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Classic REST (§5.1): POST JSON to ``{client_endpoint}{method}``; returns ``result``."""
        return self._execute(method, "classic", dict(params or {}), self._headers())

    def call_v3(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        write: bool = False,
    ) -> Any:
        """REST 3.0 (§5.2): POST JSON to ``{portal}/rest/api/{method}``; returns ``result``.

        Writes (``write=True``, a given ``idempotency_key``, or a name ending in
        :data:`WRITE_SUFFIXES`) carry ``Idempotency-Key``: the given one (1–255 printable ASCII)
        or a fresh one. Pass your own to make retries across processes safe.
        """
        headers = self._headers()
        if write or idempotency_key is not None or method.lower().endswith(WRITE_SUFFIXES):
            key = idempotency_key if idempotency_key is not None else uuid.uuid4().hex
            if not _IDEMPOTENCY_KEY.match(key):
                raise ValueError("Idempotency-Key must be 1-255 printable ASCII characters")
            headers["Idempotency-Key"] = key
        return self._execute(method, "v3", dict(params or {}), headers)

    def list_v3(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        page_size: int = 50,
        *,
        known_page: int = 0,
        max_items: int = MAX_LIST_ITEMS,
    ) -> V3Listing:
        """All ``items`` of a v3 list method, paging with ``pagination{limit, offset}``.

        v3 lists return no total, and the page size a portal really returns is not documented
        (§5.2: ``tasks.task.result.list`` has no stated default or maximum; real portals cap
        ``tasks.task.list`` at 50 whatever ``limit`` says). So a page shorter than ``page_size``
        ends the list only when it is shorter than a page this portal is known to return in
        full: ``known_page`` (what the caller remembers of earlier lists) or a page seen during
        this listing. Otherwise the next page is asked for: an empty one ends the list, a
        non-empty one proves the short page was the portal's cap, and pages of that size go
        on. :attr:`V3Listing.largest_page` is what the caller may remember next time.

        A portal that answers anything: pages that bring no new item (an ignored ``offset``)
        end the list, and at most ``max_items`` items are read.
        """
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000")
        items: list[Any] = []
        seen: set[Any] = set()
        largest = max(0, known_page)
        cap: int | None = None  # the portal's proven page cap, below page_size
        unresolved: int | None = None  # a short page that may be the cap or the end
        while len(items) < max_items:
            result = self.call_v3(
                method, {**(params or {}), "pagination": {"limit": page_size, "offset": len(items)}}
            )
            page = result.get("items") if isinstance(result, dict) else None
            if not isinstance(page, list):
                raise BitrixError("INVALID_RESPONSE", f"{method} returned no items list")
            if not page:
                break
            if unresolved is not None:
                cap, unresolved = unresolved, None
            fresh = [item for item in page if _item_key(item) not in seen]
            if not fresh:
                logger.warning("bitrix24 %s repeated a page; the listing ends there", method)
                break
            seen.update(_item_key(item) for item in fresh)
            items.extend(fresh)
            known, largest = largest, max(largest, len(page))
            if len(page) >= page_size:
                continue
            if cap is not None:
                if len(page) < cap:
                    break
                continue
            if len(page) < known:
                break
            unresolved = len(page)
        else:
            logger.warning("bitrix24 %s listing stopped at %s items", method, max_items)
        return V3Listing(items=items[:max_items], largest_page=largest)

    # -- internals --

    def _headers(self) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": self._config.user_agent,
        }

    def _url(self, method: str, api: Api) -> str:
        if api == "v3":
            return f"{self._origin}/rest/api/{method}"
        return f"{self.client_endpoint}{method}"

    def _execute(
        self, method: str, api: Api, params: dict[str, Any], headers: dict[str, str]
    ) -> Any:
        if not _METHOD_NAME.match(method):
            raise ValueError(f"invalid Bitrix24 method name {method!r}")
        home = self._origin
        try:
            result = self._exchange(method, api, params, headers)
        finally:
            moved_to, self._origin = self._origin, home
        if moved_to != home and self._on_domain_change is not None:
            self._on_domain_change(client_endpoint_for(moved_to), self._access_token)
        return result

    def _exchange(
        self, method: str, api: Api, params: dict[str, Any], headers: dict[str, str]
    ) -> Any:
        """One call, following one redirect and one token refresh; may move ``_origin``."""
        refreshed = moved = False
        while True:
            response, started, waited = self._send(method, api, params, headers)
            host = urlsplit(self._origin).netloc
            if response.is_redirect and not moved:
                _log_exchange(
                    method,
                    api,
                    host,
                    status=response.status_code,
                    started=started,
                    error="DOMAIN_CHANGED",
                    waited=waited,
                )
                self._follow_domain_change(response)
                moved = True
                continue
            body = _json_body(response)
            error = _ErrorInfo.from_response(response, body, (self._access_token,))
            _log_exchange(
                method,
                api,
                host,
                status=response.status_code,
                started=started,
                error=error.code if error else None,
                waited=waited,
            )
            if error is None:
                return self._success(method, body)
            exc = self._exception_for(method, error)
            if not isinstance(exc, BitrixTokenExpired) or self._on_expired is None:
                raise exc
            if refreshed:
                raise BitrixAuthError(exc.code, exc.description, status=exc.status) from exc
            self._access_token = self._on_expired()
            refreshed = True

    def _send(
        self, method: str, api: Api, params: dict[str, Any], headers: dict[str, str]
    ) -> tuple[requests.Response, float, float]:
        """Pass the host's breaker, acquire a rate-limit and an in-flight slot and POST once,
        reading the whole answer within the deadline and size cap; returns (response, started,
        seconds waited). Transport failures and 5xx answers without a Bitrix24 error body count
        against the host's breaker, any other answer closes it."""
        host = urlsplit(self._origin).netloc
        started = time.monotonic()
        probe = self._pass_breaker(method, api, host, started)
        sent, waited = False, 0.0
        try:
            waited, slot = self._acquire_slot()
            started = time.monotonic()
            sent = True
            try:
                response = _bounded_request(
                    lambda **transport: self._session.post(
                        self._url(method, api),
                        json={**params, "auth": self._access_token},
                        headers=headers,
                        allow_redirects=False,
                        **transport,
                    ),
                    self._config,
                )
            finally:
                if slot is not None and self._inflight is not None:
                    self._inflight.release(self._limiter_key, slot)
        except requests.RequestException as exc:
            error = _transport_error(exc, host)
            _log_exchange(
                method, api, host, status=None, started=started, error=error.code, waited=waited
            )
            if self._breaker is not None and isinstance(error, BitrixUnavailable):
                self._breaker.failed(host)
            raise error from exc
        except BaseException:
            if self._breaker is not None and not sent:
                self._breaker.abandoned(host, probe)
            raise
        if self._breaker is not None:
            if response.status_code >= 500 and not _has_error_code(_json_body(response)):
                self._breaker.failed(host)
            else:
                self._breaker.succeeded(host)
        return response, started, waited

    def _pass_breaker(self, method: str, api: Api, host: str, started: float) -> bool:
        """Fail fast while the host's breaker is open; True when this call is its probe."""
        if self._breaker is None:
            return False
        try:
            return self._breaker.before(host)
        except BreakerOpen as exc:
            _log_exchange(
                method, api, host, status=None, started=started, error="PORTAL_UNREACHABLE"
            )
            raise BitrixUnavailable(
                "PORTAL_UNREACHABLE",
                f"{host} failed repeatedly; no request is sent to it for a while",
                retry_after=exc.retry_after,
            ) from None

    def _acquire_slot(self) -> tuple[float, str | None]:
        """A rate-limit slot, then an in-flight one: (seconds waited, in-flight slot id)."""
        waited = 0.0
        if self._limiter is not None:
            try:
                waited = self._limiter.acquire(
                    self._limiter_key, self._burst, self._rate, max_wait=self._limiter_max_wait
                )
            except RateLimitTimeout as exc:
                raise BitrixUnavailable(
                    "RATE_LIMITED",
                    "no request slot for this portal within the allowed wait",
                    retry_after=exc.retry_after,
                ) from exc
        if self._inflight is None:
            return waited, None
        wait = self._config.deadline
        if self._limiter_max_wait is not None:
            wait = min(wait, self._limiter_max_wait)
        try:
            slot = self._inflight.acquire(
                self._limiter_key,
                self._max_inflight,
                max_wait=wait,
                ttl=self._config.deadline + INFLIGHT_TTL_MARGIN_S,
            )
        except InflightTimeout as exc:
            raise BitrixUnavailable(
                "PORTAL_BUSY",
                f"{self._max_inflight} requests to this portal are in flight already",
                retry_after=exc.retry_after,
            ) from exc
        return waited, slot

    def _follow_domain_change(self, response: requests.Response) -> None:
        location = urljoin(response.url, response.headers["Location"])
        new_origin = check_base_url(location, allow_private=self._config.allow_private)
        if new_origin == self._origin:
            raise BitrixError(
                "UNEXPECTED_REDIRECT",
                f"portal redirected within {urlsplit(new_origin).netloc}",
                status=response.status_code,
            )
        self._origin = new_origin
        logger.warning(
            "bitrix24 portal redirected to %s (§5.1 domain change?)", urlsplit(new_origin).netloc
        )

    def _success(self, method: str, body: dict[str, Any]) -> Any:
        if "result" not in body:
            raise BitrixError("INVALID_RESPONSE", f"{method} returned no result")
        time_block = _time_block(body)
        if time_block is not None:
            self.last_time = time_block
            reset_at = time_block.get("operating_reset_at")
            if isinstance(reset_at, int | float):
                self._operating_reset_at[method] = int(reset_at)
        return body["result"]

    def _exception_for(self, method: str, error: _ErrorInfo) -> BitrixError:
        if error.code == "QUERY_LIMIT_EXCEEDED":
            seconds = error.retry_after
            if seconds is None:
                seconds = max(1.0, self._burst * QUERY_LIMIT_PENALTY_SHARE / self._rate)
            if self._limiter is not None:
                self._limiter.penalize(self._limiter_key, seconds)
            return BitrixUnavailable(
                error.code, error.description, status=error.status, retry_after=seconds
            )
        if error.code == "OPERATION_TIME_LIMIT":
            reset_at = (error.time or {}).get("operating_reset_at")
            if not isinstance(reset_at, int | float):
                reset_at = self._operating_reset_at.get(method)
            return error.exception(operating_reset_at=None if reset_at is None else int(reset_at))
        return error.exception()
