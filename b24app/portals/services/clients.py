"""Process-wide plumbing shared by every call to Bitrix24: the configuration, the HTTP
session, the rate limiter, the circuit breaker, the in-flight cap and the REST clients built on
them."""

from __future__ import annotations

from functools import lru_cache

from django.conf import settings
from django.utils.translation import gettext_lazy as _

from b24app.portals.bitrix import BitrixClient, BitrixConfig, OAuthServer, build_session
from b24app.portals.breaker import (
    CircuitBreaker,
    InflightLimiter,
    breaker_from_url,
    inflight_from_url,
)
from b24app.portals.models import Portal
from b24app.portals.ratelimit import (
    WEB_LIMITER_WAIT_S,
    RateLimiter,
    limiter_from_url,
    parse_rate,
)
from b24app.portals.services.exceptions import NotConfigured


def bitrix_config() -> BitrixConfig:
    return _config(
        settings.B24_CLIENT_ID,
        settings.B24_CLIENT_SECRET,
        tuple(settings.B24_OAUTH_SERVERS),
        settings.B24_ALLOW_PRIVATE_PORTALS,
        settings.B24_HTTP_READ_TIMEOUT,
        settings.B24_HTTP_DEADLINE,
        settings.B24_HTTP_MAX_BODY,
    )


@lru_cache(maxsize=4)
def _config(
    client_id, client_secret, oauth_servers, allow_private, read_timeout, deadline, max_body
) -> BitrixConfig:
    return BitrixConfig(
        client_id=client_id,
        client_secret=client_secret,
        oauth_servers=oauth_servers,
        allow_private=allow_private,
        read_timeout=read_timeout,
        deadline=deadline,
        max_body_bytes=max_body,
    )


@lru_cache(maxsize=4)
def _session_for(config: BitrixConfig):
    return build_session(config)


def http_session():
    return _session_for(bitrix_config())


@lru_cache(maxsize=4)
def _limiter_for(redis_url: str) -> RateLimiter:
    return limiter_from_url(redis_url or None)


def rate_limiter() -> RateLimiter:
    return _limiter_for(settings.REDIS_URL)


@lru_cache(maxsize=4)
def _breaker_for(redis_url: str, failures: int, cooldown: float) -> CircuitBreaker:
    return breaker_from_url(redis_url or None, failures, cooldown)


def circuit_breaker() -> CircuitBreaker:
    """The per-portal-host breaker, shared through Redis when REDIS_URL is set."""
    return _breaker_for(
        settings.REDIS_URL, settings.B24_BREAKER_FAILURES, settings.B24_BREAKER_COOLDOWN
    )


@lru_cache(maxsize=4)
def _inflight_for(redis_url: str) -> InflightLimiter:
    return inflight_from_url(redis_url or None)


def inflight_limiter() -> InflightLimiter:
    """The per-portal cap on requests in flight, shared through Redis when REDIS_URL is set."""
    return _inflight_for(settings.REDIS_URL)


def oauth_server() -> OAuthServer:
    return OAuthServer(bitrix_config(), session=http_session())


def portal_rate(portal: Portal) -> tuple[int, float]:
    return parse_rate(portal.rate_limit or settings.B24_RATE_LIMIT)


def require_configured() -> BitrixConfig:
    config = bitrix_config()
    if not (config.client_id and config.client_secret):
        raise NotConfigured(
            _(
                "This app is not connected to Bitrix24 yet: its operator has to set "
                "B24_CLIENT_ID and B24_CLIENT_SECRET."
            ),
            code="not_configured",
        )
    return config


def _client(
    client_endpoint: str,
    access_token: str,
    *,
    member_id: str,
    rate: tuple[int, float],
    limiter_max_wait: float | None,
    on_domain_change=None,
    on_expired=None,
) -> BitrixClient:
    """A REST client on the process-wide session and shared limiter. `on_domain_change` is told
    of a domain change the portal answers with (a stored portal's, see `_portal_client`)."""
    return BitrixClient(
        client_endpoint,
        access_token,
        config=bitrix_config(),
        on_expired=on_expired,
        on_domain_change=on_domain_change,
        limiter=rate_limiter(),
        limiter_key=member_id,
        rate=rate,
        limiter_max_wait=limiter_max_wait,
        session=http_session(),
        breaker=circuit_breaker(),
        inflight=inflight_limiter(),
        max_inflight=settings.B24_PORTAL_MAX_INFLIGHT,
    )


def request_client(client_endpoint: str, access_token: str, *, member_id: str) -> BitrixClient:
    """A client for the token a web request brought (an install POST, a lifecycle event), to a
    portal that may not be stored yet: the default rate and a web request's short wait."""
    return _client(
        client_endpoint,
        access_token,
        member_id=member_id,
        rate=parse_rate(settings.B24_RATE_LIMIT),
        limiter_max_wait=WEB_LIMITER_WAIT_S,
    )
