"""Checks of what Bitrix24 sends: a member_id's form, an access token vouched for by an
allow-listed OAuth server (`app.info`), a posted `application_token`."""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.utils.crypto import salted_hmac
from django.utils.translation import gettext_lazy as _

from b24app.portals import crypto
from b24app.portals.bitrix import (
    BitrixError,
    BitrixUnavailable,
    UnsafeURL,
    check_base_url,
    client_endpoint_for,
    oauth_origin_for,
)
from b24app.portals.bitrix.methods import Profile, trusted_app_info_parse
from b24app.portals.models import Portal
from b24app.portals.ratelimit import limiter_degraded
from b24app.portals.services.clients import oauth_server, rate_limiter, require_configured
from b24app.portals.services.exceptions import VerificationFailed

logger = logging.getLogger(__name__)

_MEMBER_ID_CHARS = frozenset("0123456789abcdefABCDEF")


def is_member_id(value: str) -> bool:
    """A portal's member_id as Bitrix24 sends it: 1 to 64 hex characters."""
    return 0 < len(value) <= 64 and set(value) <= _MEMBER_ID_CHARS


@dataclass(frozen=True)
class VerifiedAuth:
    """What the OAuth server vouched for about an access token."""

    oauth_server: str
    member_id: str
    domain: str
    client_endpoint: str
    user_id: int | None
    status: str
    scope: str
    installed: bool


def auth_verify(
    *, access_token: str, member_id: str, domain: str | None, server_endpoint: str | None
) -> VerifiedAuth:
    """Ask an allow-listed OAuth server's `app.info` whether `access_token` was issued to this
    app for portal `member_id` (and `domain`, when given). Raises `VerificationFailed`.

    Without a `server_endpoint` (older frame POSTs lack it) every allow-listed server is asked
    in turn; a token only ever goes to servers on `B24_OAUTH_SERVERS`.
    """
    config = require_configured()
    if not access_token or not member_id:
        raise VerificationFailed(_("The request carries no Bitrix24 authorization."))
    try:
        origins = (
            (oauth_origin_for(server_endpoint, config),)
            if server_endpoint
            else config.oauth_servers
        )
    except UnsafeURL as exc:
        raise VerificationFailed(
            _("The request names an OAuth server this app does not trust."), code="untrusted_server"
        ) from exc
    info, origin, unavailable = None, None, False
    for origin in origins:
        try:
            info = oauth_server().app_info(origin, access_token)
            break
        except BitrixUnavailable:
            unavailable = True
        except BitrixError:
            continue  # this server does not know the token
    if info is None:
        if unavailable:
            raise VerificationFailed(
                _("Bitrix24 could not confirm the request right now; try again."),
                code="unavailable",
            )
        raise VerificationFailed(_("Bitrix24 did not confirm the authorization."), code="rejected")
    vouched = trusted_app_info_parse(info)
    if vouched.client_id != config.client_id:
        raise VerificationFailed(_("The authorization was issued to another app."), code="mismatch")
    if vouched.member_id != member_id:
        raise VerificationFailed(_("The authorization belongs to another portal."), code="mismatch")
    if domain is not None and vouched.domain != domain.lower():
        raise VerificationFailed(_("The authorization belongs to another domain."), code="mismatch")
    try:
        base = check_base_url(
            vouched.client_endpoint or f"https://{vouched.domain}/rest/",
            allow_private=config.allow_private,
        )
    except UnsafeURL as exc:
        raise VerificationFailed(
            _("The portal's address is not one this app may talk to."), code="unsafe_portal"
        ) from exc
    return VerifiedAuth(
        oauth_server=origin,
        member_id=member_id,
        domain=vouched.domain,
        client_endpoint=client_endpoint_for(base),
        user_id=vouched.user_id or None,
        status=vouched.status,
        scope=vouched.scope,
        installed=vouched.installed,
    )


def application_token_matches(portal: Portal, application_token: str) -> bool:
    """Constant-time check of a posted `application_token` against the stored fingerprint."""
    if not portal.application_token_hash or not application_token:
        return False
    return hmac.compare_digest(portal.application_token_hash, crypto.fingerprint(application_token))


# --- who a frame's access token belongs to, remembered for its lifetime -------------------------

IDENTITY_TTL_S = 10 * 60
"""The longest a verified identity (`profile`'s answer) is reused for the same `AUTH_ID`; never
longer than the token's own `AUTH_EXPIRES`."""
_IDENTITY_PURPOSE = "b24app.portals.frame-identity"
_clock = time.time


def identity_key(member_id: str, access_token: str) -> str:
    """The cache key of an access token's verified identity on portal `member_id`: an HMAC-SHA256
    keyed by the server's secret (`SECRET_KEY`, with a purpose of its own), never the token."""
    digest = salted_hmac(
        _IDENTITY_PURPOSE,
        f"{member_id}\x00{access_token}",
        secret=settings.SECRET_KEY,
        algorithm="sha256",
    ).hexdigest()
    return f"frame-identity:{member_id}:{digest}"


def _cache_unreachable() -> bool:
    """The cache is Redis (`REDIS_URL`) and the shared limiter, on the same Redis, found it
    unreachable and has not reached it since: skip the cache instead of waiting out its
    timeouts on every open (the limiter asks Redis again after its retry interval)."""
    return limiter_degraded(rate_limiter())


def identity_recall(member_id: str, access_token: str) -> Profile | None:
    """The identity `profile` gave for this token on this portal, while the token still lives."""
    if _cache_unreachable():
        return None
    try:
        held = cache.get(identity_key(member_id, access_token))
    except Exception:  # the cache is down: ask `profile` as if it had nothing
        logger.warning("frame identity cache unavailable", exc_info=True)
        return None
    if not isinstance(held, dict) or held.get("until", 0) <= _clock():
        return None
    return Profile(id=int(held["id"]), name=str(held["name"]), admin=bool(held["admin"]))


def identity_remember(member_id: str, access_token: str, profile: Profile, expires_in: str) -> None:
    """Keep `profile`'s answer for this token for the rest of its lifetime (`AUTH_EXPIRES`,
    seconds), `IDENTITY_TTL_S` at most; nothing for a token that names no lifetime."""
    try:
        lifetime = int(expires_in)
    except (TypeError, ValueError):
        return
    ttl = min(lifetime, IDENTITY_TTL_S)
    if ttl <= 0 or not profile.id:
        return
    held = {"id": profile.id, "name": profile.name, "admin": profile.admin}
    held["until"] = _clock() + ttl
    if _cache_unreachable():
        return
    try:
        cache.set(identity_key(member_id, access_token), held, timeout=ttl)
    except Exception:
        logger.warning("frame identity cache unavailable", exc_info=True)
