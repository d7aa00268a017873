"""REST calls to one portal (§5): classic and REST 3.0, paced, bounded and typed."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import requests

from b24app import metrics
from b24app.masking import mask_secret
from b24app.portals.bitrix.config import BitrixConfig
from b24app.portals.bitrix.errors import (
    BitrixAuthError,
    BitrixError,
    BitrixTokenExpired,
    BitrixUnavailable,
    _ErrorInfo,
    _has_error_code,
    _time_block,
)
from b24app.portals.bitrix.netguard import check_base_url, client_endpoint_for
from b24app.portals.bitrix.transport import (
    BitrixSession,
    _bounded_request,
    _json_body,
    _log_exchange,
    _transport_error,
    build_session,
)
from b24app.portals.breaker import (
    BreakerOpen,
    CircuitBreaker,
    InflightLimiter,
    InflightTimeout,
)
from b24app.portals.ratelimit import RateLimiter, RateLimitTimeout

__all__ = ["WRITE_SUFFIXES", "BitrixClient", "V3Listing"]

logger = logging.getLogger("b24app.bitrix")

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
        session: BitrixSession | None = None,
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
                    lambda **transport: self._session.post_json(
                        self._url(method, api),
                        {**params, "auth": self._access_token},
                        headers=headers,
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
            metrics.limiter_waited(waited)
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
            metrics.query_limit_exceeded(method)
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
