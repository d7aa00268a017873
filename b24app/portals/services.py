"""Writes about portals and accounts: install, lifecycle events, OAuth reconnect, token refresh.

Every HTTP exchange goes through `bitrix.py`. No transaction is held open across an HTTP call,
except the token refresh under its row lock (short, bounded by the client's timeouts and the
database's lock timeout).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from django.conf import settings
from django.db import IntegrityError, OperationalError, connection, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.ids import parse_id
from b24app.portals import bindings, crypto
from b24app.portals.bindings import binding_add, bindings_ensure, bindings_read
from b24app.portals.bitrix import (
    BitrixAuthError,
    BitrixClient,
    BitrixConfig,
    BitrixError,
    BitrixTokenExpired,
    BitrixUnavailable,
    OAuthServer,
    TokenSet,
    UnsafeURL,
    build_session,
    oauth_origin_for,
)
from b24app.portals.breaker import (
    CircuitBreaker,
    InflightLimiter,
    breaker_from_url,
    inflight_from_url,
)
from b24app.portals.models import Account, EventReceipt, Portal
from b24app.portals.netguard import check_base_url, client_endpoint_for
from b24app.portals.ratelimit import (
    WEB_LIMITER_WAIT_S,
    RateLimiter,
    limiter_from_url,
    parse_rate,
)
from b24app.portals.ratelimit_db import DatabaseLeakyBucket

logger = logging.getLogger("b24app.portals")

REFRESH_LOCK_MARGIN_S = 5.0
LOCK_NOT_AVAILABLE = "55P03"
"""PostgreSQL's SQLSTATE for a lock wait that ran out (`lock_timeout`)."""
REFRESH_BUSY_RETRY_S = 5.0

APP_CREDENTIAL_ERRORS = frozenset({"invalid_client", "wrong_client"})
"""OAuth-server answers about the app's own credentials, never about one user's token."""

BINDINGS_SETTLE_S = 120.0
"""After an app update, its bindings are checked again this long after its event: Bitrix24 may
drop them after the event was delivered as well as before."""
EVENT_RECEIPT_DAYS = 7
"""How long an applied event is remembered against copies of it (retrying proxies, replays)."""
AWAITING_SIGN_IN_RETRY_S = 300.0
"""Work as a user whose account waits for their next visit is retried after this long."""
WAITING_REASON = (
    "A token renewal's answer was lost on its way from Bitrix24; access returns when this user "
    "next opens the app"
)
UNPROVEN_REASON = (
    "Bitrix24 refused the refresh token this user's last frame brought; access returns when "
    "this user next opens the app"
)
NO_REFRESH_REASON = (
    "Bitrix24 opened the app for this user without a refresh token and the access token has "
    "expired; access returns when this user next opens the app"
)


_MEMBER_ID_CHARS = frozenset("0123456789abcdefABCDEF")


def is_member_id(value: str) -> bool:
    """A portal's member_id as Bitrix24 sends it: 1 to 64 hex characters."""
    return 0 < len(value) <= 64 and set(value) <= _MEMBER_ID_CHARS


class PortalError(Exception):
    """A request about a portal that cannot be carried out; `message` is safe to show a person."""

    def __init__(self, message, *, code: str = "invalid") -> None:
        super().__init__(str(message))
        self.message = message
        self.code = code


class VerificationFailed(PortalError):
    pass


class NotConfigured(VerificationFailed):
    """No B24_CLIENT_ID/B24_CLIENT_SECRET: nothing can be verified, so everything is refused."""


# --- process-wide plumbing ---------------------------------------------------------------------


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
    return limiter_from_url(redis_url or None, fallback=DatabaseLeakyBucket())


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


# --- verification ------------------------------------------------------------------------------


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
    install = info.get("install") if isinstance(info.get("install"), dict) else {}
    if str(info.get("client_id", "")) != config.client_id:
        raise VerificationFailed(_("The authorization was issued to another app."), code="mismatch")
    if str(install.get("member_id", "")) != member_id:
        raise VerificationFailed(_("The authorization belongs to another portal."), code="mismatch")
    vouched_domain = str(install.get("domain", "")).lower()
    if domain is not None and vouched_domain != domain.lower():
        raise VerificationFailed(_("The authorization belongs to another domain."), code="mismatch")
    try:
        base = check_base_url(
            str(install.get("client_endpoint") or f"https://{vouched_domain}/rest/"),
            allow_private=config.allow_private,
        )
    except UnsafeURL as exc:
        raise VerificationFailed(
            _("The portal's address is not one this app may talk to."), code="unsafe_portal"
        ) from exc
    user_id = info.get("user_id")
    return VerifiedAuth(
        oauth_server=origin,
        member_id=member_id,
        domain=vouched_domain,
        client_endpoint=client_endpoint_for(base),
        user_id=parse_id(user_id) or None,
        status=str(install.get("status") or ""),
        scope=str(info.get("scope") or install.get("scope") or ""),
        installed=bool(install.get("installed")),
    )


def application_token_matches(portal: Portal, application_token: str) -> bool:
    """Constant-time check of a posted `application_token` against the stored fingerprint."""
    if not portal.application_token_hash or not application_token:
        return False
    return hmac.compare_digest(portal.application_token_hash, crypto.fingerprint(application_token))


# --- portals and accounts ----------------------------------------------------------------------


@transaction.atomic
def portal_upsert(*, verified: VerifiedAuth, application_token: str = "") -> Portal:
    """Create or update the portal the OAuth server vouched for, and make it active."""
    portal, _ = Portal.objects.select_for_update().get_or_create(
        member_id=verified.member_id,
        defaults={
            "domain": verified.domain,
            "client_endpoint": verified.client_endpoint,
            "oauth_server": verified.oauth_server,
        },
    )
    now = timezone.now()
    portal.domain = verified.domain
    portal.client_endpoint = verified.client_endpoint
    portal.oauth_server = verified.oauth_server
    portal.app_status = verified.status[:1]
    if application_token:
        portal.application_token_hash = crypto.fingerprint(application_token)
    if portal.state != Portal.State.ACTIVE and not portal.blocked_by_operator:
        portal.set_state(Portal.State.ACTIVE, "installed", at=now)
        portal.installed_at = now
    portal.last_seen_at = now
    portal.save()
    return portal


@transaction.atomic
def account_tokens_store(
    *,
    portal: Portal,
    user_id: int,
    tokens: TokenSet,
    is_installer: bool | None = None,
    is_admin: bool | None = None,
    display_name: str | None = None,
    from_frame: bool = False,
) -> Account:
    """Store a fresh token pair for (portal, user): a new `token_version`, active again.

    `from_frame`: the tokens came in a frame POST or a frame's renewal, whose `REFRESH_ID` no
    one has seen work (see `_tokens_apply`)."""
    account, _ = Account.objects.select_for_update().get_or_create(portal=portal, user_id=user_id)
    _tokens_apply(account, tokens, from_frame=from_frame)
    if is_installer is not None:
        account.is_installer = is_installer or account.is_installer
    if is_admin is not None:
        account.is_admin = is_admin
    if display_name:
        account.display_name = _stored_name(display_name)
    account.last_seen_at = timezone.now()
    account.save()
    return account


def _tokens_apply(account: Account, tokens: TokenSet, *, from_frame: bool = False) -> None:
    """Put fresh tokens on the account and make it active again.

    A refresh token from a frame (`from_frame`) is one nobody has seen work: any user can post
    any `REFRESH_ID` beside their genuine `AUTH_ID`. It never replaces one the OAuth server
    issued that is not known to be spent or refused (the account is active, no renewal with it
    was lost); otherwise it is kept, marked `refresh_from_frame` until a renewal with it works,
    and its refusal then only makes the account wait for its user (`_refresh_token_spend`).

    Without a refresh token (a frame opened without `REFRESH_ID`) only the access token is new:
    the refresh token the account already holds is kept, with what is known about it (when it
    was issued, whether a renewal with it may have been lost), because it is still the one that
    lets the app act after the frame closes. Unless Bitrix24 already refused it (the account
    waits or is blocked for that reason): then it is dropped, so that no token call is made with
    it again, and the account waits for its user once the access token expires.
    """
    account.access_token_encrypted = crypto.encrypt(tokens.access_token)
    keeps_proven = (
        from_frame
        and account.state == Account.State.ACTIVE
        and account.can_refresh
        and not account.refresh_from_frame
        and account.refresh_unconfirmed_at is None
    )
    if tokens.refresh_token and not keeps_proven:
        account.refresh_token_encrypted = crypto.encrypt(tokens.refresh_token)
        account.refresh_from_frame = from_frame
        account.tokens_issued_at = timezone.now()
        account.refresh_unconfirmed_at = None
    elif not tokens.refresh_token and account.state != Account.State.ACTIVE:
        account.refresh_token_encrypted = ""
        account.tokens_issued_at = None
        account.refresh_unconfirmed_at = None
    account.expires_at = tokens.expires_at
    if tokens.scope:
        account.scope = tokens.scope.replace("\x00", "")[:500]
    account.token_version += 1
    account.state = Account.State.ACTIVE
    account.state_reason = ""
    account.last_refresh_error = ""


def refresh_lock_wait_s() -> float:
    """How long a caller waits for another caller's token refresh of the same account: longer
    than that refresh can hold the lock, which is two token requests (a POST, and a GET once
    the server proved it reads no POST body), each within the transport's deadline."""
    return 2 * bitrix_config().deadline + REFRESH_LOCK_MARGIN_S


def _lock_timeout() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL lock_timeout = '{round(refresh_lock_wait_s() * 1000)}ms'")


def _lock_timed_out(exc: OperationalError) -> bool:
    return getattr(exc.__cause__, "sqlstate", None) == LOCK_NOT_AVAILABLE


class AccountAwaitingSignIn(BitrixUnavailable):
    """The account waits for its user's next visit to get tokens again (`Account.State.WAITING`).

    A kind of "unavailable": work done as this user is retried later, not refused, and no token
    call is made meanwhile."""

    CODE = "ACCOUNT_AWAITING_SIGN_IN"

    def __init__(self, reason: str) -> None:
        super().__init__(self.CODE, reason, retry_after=AWAITING_SIGN_IN_RETRY_S)


def _refusable(account: Account) -> None:
    """Raise for an account that cannot act as its user now, before any call is made."""
    if account.state == Account.State.WAITING:
        raise AccountAwaitingSignIn(account.state_reason)
    if account.state == Account.State.BLOCKED or not account.has_tokens:
        raise BitrixAuthError(
            "ACCOUNT_BLOCKED", account.state_reason or "the account has no tokens"
        )


def account_tokens_refresh(*, account_id: int, seen_version: int | None = None) -> Account:
    """Refresh an account's tokens once, race-free.

    Under a row lock on the account, re-read it: if its `token_version` moved past
    `seen_version`, another caller already refreshed and its tokens win. Otherwise spend the
    refresh token and store the new pair in the same transaction.

    Failures: a transient one (timeout, lost connection, 5xx) is recorded and raised, and the
    account remembers that the renewal's outcome is unknown (`refresh_unconfirmed_at`): Bitrix24
    may have rotated the token and lost its answer. A later `invalid_grant` is then most likely
    that rotation, not a revocation: the account waits for its user's next visit, and nothing
    is blocked. Otherwise `invalid_grant` (with nobody else having refreshed, which the lock
    guarantees) blocks the account, and its portal when it is the installer's.

    An account without a refresh token (its user's frame came without `REFRESH_ID`) makes no
    token call: it waits for its user (`AccountAwaitingSignIn`), like one whose renewal was lost.
    """
    try:
        with transaction.atomic():
            _lock_timeout()
            account = (
                Account.objects.select_for_update().select_related("portal").get(pk=account_id)
            )
            if seen_version is not None and account.token_version != seen_version:
                return account
            _refusable(account)
            if account.can_refresh:
                failure = _refresh_token_spend(account)
            else:
                # Bitrix24 opened the frame without REFRESH_ID: nothing to spend, so no token
                # call. Like a lost renewal, only the user's next visit (or the open frame's
                # refreshAuth) brings access back; meanwhile their work waits, not fails.
                failure = AccountAwaitingSignIn(NO_REFRESH_REASON)
                _account_wait(account, NO_REFRESH_REASON)
    except OperationalError as exc:
        if not _lock_timed_out(exc):
            raise
        # Another caller's refresh of this account outlasted its deadline: nothing is known
        # yet, so this caller is busy, not refused (a web request says "try again", a task
        # retries).
        raise BitrixUnavailable(
            "REFRESH_BUSY",
            "another renewal of this user's tokens is still under way",
            retry_after=REFRESH_BUSY_RETRY_S,
        ) from exc
    if failure is not None:
        logger.warning(
            "token refresh failed portal=%s user=%s error=%s",
            account.portal.member_id,
            account.user_id,
            failure.code,
        )
        raise failure
    return account


def _refresh_token_spend(account: Account) -> BitrixError | None:
    """Spend the locked account's refresh token: store the new pair, or record the failure (see
    `account_tokens_refresh`) and return it for the caller to raise after the transaction."""
    failure: BitrixError | None = None
    now = timezone.now()
    try:
        tokens = oauth_server().refresh(account.portal.oauth_server, account.refresh_token)
    except BitrixAuthError as exc:
        failure = exc
        if exc.code in APP_CREDENTIAL_ERRORS:
            failure = _credentials_refused(account, exc, at=now)
        elif account.refresh_unconfirmed_at is not None:
            failure = AccountAwaitingSignIn(WAITING_REASON)
            _account_wait(account, f"{WAITING_REASON} ({exc.code})")
        elif account.refresh_from_frame:
            # Nobody saw this refresh token work: it may be anything the user's browser posted.
            failure = AccountAwaitingSignIn(UNPROVEN_REASON)
            _account_wait(account, f"{UNPROVEN_REASON} ({exc.code})")
        else:
            reason = (
                f"Refresh token rejected by Bitrix24 ({exc.code}); the user must open the app again"
            )
            _account_block(account, reason, at=now)
    except BitrixError as exc:
        failure = exc
        account.last_refresh_error = f"{exc.code}: temporary, will retry"[:500]
        if not isinstance(exc, UnsafeURL):  # refused before sending: nothing was spent
            account.refresh_unconfirmed_at = now
        account.save(update_fields=["last_refresh_error", "refresh_unconfirmed_at", "updated_at"])
    else:
        if (tokens.member_id and tokens.member_id != account.portal.member_id) or (
            tokens.user_id and tokens.user_id != account.user_id
        ):
            failure = BitrixAuthError("TOKEN_MISMATCH", "refreshed tokens name someone else")
            _account_block(account, "Refreshed tokens belonged to someone else", at=now)
        else:
            _tokens_apply(account, tokens)
            account.last_refreshed_at = now
            account.save()
        logger.info(
            "tokens refreshed portal=%s user=%s version=%s via=%s",
            account.portal.member_id,
            account.user_id,
            account.token_version,
            tokens.request_method,
        )
    return failure


def _credentials_refused(account: Account, exc: BitrixAuthError, *, at) -> BitrixError:
    """The OAuth server refused the app's own credentials (`invalid_client`, `wrong_client`).

    That is a deployment fault (wrong B24_CLIENT_ID/B24_CLIENT_SECRET) unless the same
    credentials keep working for other portals: the OAuth docs also list `invalid_client` for
    an app that is not installed on the portal. Then it is a removal to confirm with `app.info`:
    confirmed, the account (and, for the installer's, the portal) is blocked with that reason,
    and its data kept, until the app is installed or opened again; unconfirmed, the account
    waits for its user. A credentials fault blocks nobody: the operator fixes the variables and
    the next call refreshes."""
    if exc.code == "invalid_client" and _credentials_work_elsewhere(account.portal):
        removed = _app_removed_says_oauth(account)
        if removed is True:
            reason = (
                "The app appears to have been removed from this Bitrix24: its OAuth server "
                "refused the app (invalid_client) and does not know its tokens, while the same "
                "credentials work for other portals. Installing or opening the app again "
                "restores it; nothing was deleted"
            )
            _account_block(account, reason, at=at)
            logger.warning("app looks removed portal=%s (invalid_client)", account.portal.member_id)
            return exc
        if removed is None:
            reason = (
                "Bitrix24 refused the app for this portal (invalid_client) while the same "
                "credentials work for other portals: the app may have been removed from it; "
                "access returns when this user opens the app again"
            )
            _account_wait(account, reason)
            return AccountAwaitingSignIn(reason)
        detail = "installed there, says app.info, though the OAuth server refused the app"
    else:
        detail = "check B24_CLIENT_ID and B24_CLIENT_SECRET"
    account.last_refresh_error = f"{exc.code}: {detail}"[:500]
    account.save(update_fields=["last_refresh_error", "updated_at"])
    logger.error("token refresh refused our app credentials error=%s", exc.code)
    return exc


CREDENTIALS_EVIDENCE = timedelta(days=7)
"""A refresh that worked for another portal this recently proves the app's credentials."""
REMOVED_CODES = frozenset(
    {"invalid_token", "invalid_client", "NOT_INSTALLED", "APPLICATION_NOT_FOUND", "ERROR_OAUTH"}
)
"""`app.info` answers meaning the OAuth server does not know the token's app on the portal."""


def _credentials_work_elsewhere(portal: Portal) -> bool:
    return (
        Account.objects.filter(
            portal__oauth_server=portal.oauth_server,
            last_refreshed_at__gte=timezone.now() - CREDENTIALS_EVIDENCE,
        )
        .exclude(portal=portal)
        .exists()
    )


def _app_removed_says_oauth(account: Account) -> bool | None:
    """`app.info` with the account's access token: True when the OAuth server does not know
    the app there, False when it vouches for the install, None when it cannot tell (an expired
    token, the server unreachable)."""
    try:
        info = oauth_server().app_info(account.portal.oauth_server, account.access_token)
    except BitrixUnavailable:
        return None
    except BitrixError as exc:
        return True if exc.code in REMOVED_CODES else None
    install = info.get("install") if isinstance(info.get("install"), dict) else {}
    if str(install.get("member_id", "")) == account.portal.member_id and install.get("installed"):
        return False
    return None


def _account_wait(account: Account, reason: str) -> None:
    account.state = Account.State.WAITING
    account.state_reason = reason[:500]
    account.last_refresh_error = reason[:500]
    account.save(update_fields=["state", "state_reason", "last_refresh_error", "updated_at"])


def _account_block(account: Account, reason: str, *, at) -> None:
    account.state = Account.State.BLOCKED
    account.state_reason = reason[:500]
    account.last_refresh_error = reason[:500]
    account.save(update_fields=["state", "state_reason", "last_refresh_error", "updated_at"])
    if account.is_installer and not account.portal.blocked_by_operator:
        portal = account.portal
        portal.set_state(Portal.State.BLOCKED, reason, at=at)
        portal.save()


def portal_address_confirm(*, portal_id: int, client_endpoint: str, access_token: str) -> bool:
    """A portal answered from another address (a redirect, §5.1 domain change): remember it
    only once the OAuth server says the portal is there now (`app.info` with the token the
    call used), and never an address another portal holds. A self-hosted portal can redirect
    to any host; until then each call follows the redirect once, and the stored address, the
    tokens' destination and the frame policy stay as they were."""
    portal = Portal.objects.filter(pk=portal_id).first()
    if portal is None:
        return False
    try:
        verified = auth_verify(
            access_token=access_token,
            member_id=portal.member_id,
            domain=None,
            server_endpoint=portal.oauth_server,
        )
    except VerificationFailed as exc:
        logger.warning(
            "portal=%s redirected; not remembered: app.info %s", portal.member_id, exc.code
        )
        return False
    if verified.client_endpoint != client_endpoint:
        logger.warning(
            "portal=%s redirected to another address than app.info names; not remembered",
            portal.member_id,
        )
        return False
    return portal_endpoint_update(portal_id=portal.pk, client_endpoint=client_endpoint)


@transaction.atomic
def portal_endpoint_update(*, portal_id: int, client_endpoint: str) -> bool:
    """The OAuth server vouched for the portal at a new address (domain change, §5.1):
    remember it, unless another portal holds that domain (then nothing changes: an address
    never moves from one tenant to another without that one moving first)."""
    portal = Portal.objects.select_for_update().get(pk=portal_id)
    domain = client_endpoint.split("://", 1)[-1].split("/", 1)[0].lower()
    if Portal.objects.filter(domain__iexact=domain).exclude(pk=portal.pk).exists():
        logger.warning(
            "portal=%s named at a domain another portal holds; not remembered", portal.member_id
        )
        return False
    portal.client_endpoint = client_endpoint
    portal.domain = domain
    portal.save(update_fields=["client_endpoint", "domain", "updated_at"])
    logger.info("portal moved member_id=%s domain=%s", portal.member_id, portal.domain)
    return True


def account_client(
    account: Account, *, limiter_max_wait: float | None = WEB_LIMITER_WAIT_S
) -> BitrixClient:
    """A REST client acting as `account`'s user, refreshing lazily and race-free.

    `limiter_max_wait` bounds each call's wait for the portal's request budget. The default is
    a web request's (`WEB_LIMITER_WAIT_S`), which web paths also pass by name; background work
    passes its own longer budget (`BACKGROUND_LIMITER_WAIT_S`, the delivery's turn)."""
    portal = account.portal
    _refusable(account)
    seen = {"version": account.token_version}

    def on_expired() -> str:
        fresh = account_tokens_refresh(account_id=account.pk, seen_version=seen["version"])
        seen["version"] = fresh.token_version
        return fresh.access_token

    access_token = account.access_token
    if account.expires_at is not None and account.expires_at <= timezone.now():
        access_token = on_expired()
    return _portal_client(
        portal, access_token, on_expired=on_expired, limiter_max_wait=limiter_max_wait
    )


def _client(
    client_endpoint: str,
    access_token: str,
    *,
    member_id: str,
    rate: tuple[int, float],
    limiter_max_wait: float | None,
    portal_id: int | None = None,
    on_expired=None,
) -> BitrixClient:
    """A REST client on the process-wide session and shared limiter. With `portal_id` (a stored
    portal) a domain change the portal answers with is remembered."""
    on_domain_change = None
    if portal_id is not None:

        def on_domain_change(endpoint: str, access_token: str) -> None:
            portal_address_confirm(
                portal_id=portal_id, client_endpoint=endpoint, access_token=access_token
            )

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


def _portal_client(
    portal: Portal, access_token: str, *, limiter_max_wait: float | None, on_expired=None
) -> BitrixClient:
    return _client(
        portal.client_endpoint,
        access_token,
        member_id=portal.member_id,
        rate=portal_rate(portal),
        limiter_max_wait=limiter_max_wait,
        portal_id=portal.pk,
        on_expired=on_expired,
    )


# --- lifecycle ---------------------------------------------------------------------------------


@transaction.atomic
def portal_uninstall(*, portal: Portal, clean: bool) -> None:
    """Bitrix24 removed the app: its tokens are dead. Wipe them; with `clean`, forget the users."""
    portal = Portal.objects.select_for_update().get(pk=portal.pk)
    portal.set_state(
        Portal.State.UNINSTALLED,
        "uninstalled on the portal" + (" (data cleaned)" if clean else ""),
    )
    portal.application_token_hash = ""
    portal.uninstall_reported_at, portal.uninstall_report = None, ""
    portal.last_seen_at = timezone.now()
    portal.save()
    if clean:
        portal.accounts.all().delete()
    else:
        portal.accounts.update(
            access_token_encrypted="",
            refresh_token_encrypted="",
            expires_at=None,
            state=Account.State.BLOCKED,
            state_reason="app uninstalled",
            updated_at=timezone.now(),
        )


@transaction.atomic
def portal_block(*, portal_id: int, reason: str) -> Portal:
    portal = Portal.objects.select_for_update().get(pk=portal_id)
    portal.set_state(Portal.State.BLOCKED, reason)
    portal.blocked_by_operator = True
    portal.save()
    return portal


@transaction.atomic
def portal_unblock(*, portal_id: int, reason: str) -> Portal:
    """Lift an operator's block (only this lifts it). The portal is active again if its
    installer's tokens work; otherwise it is blocked as by a dead token, which the installer
    opening the app or a reconnect repairs. A portal not blocked by its operator is left as is."""
    portal = Portal.objects.select_for_update().get(pk=portal_id)
    if not portal.blocked_by_operator:
        return portal
    installer_works = (
        portal.accounts.filter(is_installer=True, state=Account.State.ACTIVE)
        .exclude(refresh_token_encrypted="")
        .exists()
    )
    if installer_works:
        portal.set_state(Portal.State.ACTIVE, reason)
    else:
        portal.set_state(
            Portal.State.BLOCKED,
            f"{reason}; the installer's tokens do not work: the installer opens the app, or "
            "reconnect via OAuth",
        )
    portal.save()
    return portal


# --- install -----------------------------------------------------------------------------------

BUSY_MESSAGE = _("Bitrix24 is busy right now. Try again in a minute.")
"""What a person reads when a web request found the portal's request budget spoken for."""


def _parse_expires_in(raw: str) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return 3600
    return value if 0 < value <= 86400 else 3600


def _frame_tokens(
    *, access_token: str, refresh_token: str, expires_in: str, verified: VerifiedAuth
):
    return TokenSet(
        access_token=access_token,
        refresh_token=refresh_token,
        expires_at=timezone.now() + timedelta(seconds=_parse_expires_in(expires_in)),
        scope=verified.scope,
        member_id=verified.member_id,
        user_id=verified.user_id,
        client_endpoint=verified.client_endpoint,
        server_endpoint=verified.oauth_server + "/rest/",
        status=verified.status,
    )


def portal_install(*, auth: dict[str, str], app_url: str) -> Portal:
    """The install wizard (`POST /b24/install/`): verify, store, bind, so the page may finish.

    `auth` holds the frame POST (`AUTH_ID`, `REFRESH_ID`, `AUTH_EXPIRES`, `member_id`,
    `SERVER_ENDPOINT`, `APPLICATION_TOKEN`) and the query's `DOMAIN`. Raises `PortalError`
    with a message for the installing admin; repeating it is harmless.
    """
    verified = auth_verify(
        access_token=auth.get("AUTH_ID", ""),
        member_id=auth.get("member_id", ""),
        domain=auth.get("DOMAIN") or None,
        server_endpoint=auth.get("SERVER_ENDPOINT") or None,
    )
    if not auth.get("REFRESH_ID"):
        raise PortalError(_("Bitrix24 sent no refresh token; open the installer again."))
    tokens = _frame_tokens(
        access_token=auth["AUTH_ID"],
        refresh_token=auth["REFRESH_ID"],
        expires_in=auth.get("AUTH_EXPIRES", ""),
        verified=verified,
    )
    client = _client(
        verified.client_endpoint,
        tokens.access_token,
        member_id=verified.member_id,
        rate=parse_rate(settings.B24_RATE_LIMIT),
        limiter_max_wait=WEB_LIMITER_WAIT_S,
    )
    try:
        profile = client.call("profile") or {}
    except BitrixUnavailable as exc:
        raise PortalError(BUSY_MESSAGE, code="unavailable") from exc
    except BitrixError as exc:
        raise PortalError(_("Bitrix24 did not tell who is installing the app; try again.")) from exc
    user_id = parse_id(profile.get("ID") or verified.user_id or 0) or 0
    if not user_id:
        raise PortalError(_("Bitrix24 did not tell who is installing the app; try again."))
    if not profile.get("ADMIN"):
        raise PortalError(
            _("Only a Bitrix24 administrator can install this app."), code="not_admin"
        )
    with transaction.atomic():
        portal = portal_upsert(
            verified=verified, application_token=auth.get("APPLICATION_TOKEN", "")
        )
        account_tokens_store(
            portal=portal,
            user_id=user_id,
            tokens=tokens,
            is_installer=True,
            is_admin=True,
            display_name=_profile_name(profile),
        )
    try:
        bindings_ensure(client, app_url)
    except BitrixUnavailable as exc:
        raise PortalError(BUSY_MESSAGE, code="unavailable") from exc
    except BitrixError as exc:
        logger.warning("install bindings failed portal=%s error=%s", portal.member_id, exc.code)
        raise PortalError(
            "Bitrix24 refused to add the Results tab or the app's event handlers "
            f"({exc.code}). Nothing is finished yet; open the installer again."
        ) from exc
    portal = _bindings_record(portal, Portal.Bindings.OK, "", settled=True)
    logger.info("installed portal=%s domain=%s user=%s", portal.member_id, portal.domain, user_id)
    return portal


def _profile_name(profile: dict) -> str:
    return " ".join(part for part in (profile.get("NAME"), profile.get("LAST_NAME")) if part)


def _stored_name(name: str) -> str:
    """A person's name as `Account.display_name` holds it (no NUL, at most 255 characters)."""
    return name.replace("\x00", "")[:255]


# --- bindings ----------------------------------------------------------------------------------


def portal_bindings_due(portal: Portal) -> bool:
    """Whether an active portal's bindings should be read again: never read, or a day ago."""
    checked = portal.bindings_checked_at
    return portal.state == Portal.State.ACTIVE and (
        checked is None or timezone.now() - checked >= bindings.CHECK_EVERY
    )


def portal_bindings_check(
    *,
    portal_id: int,
    account_id: int | None = None,
    app_url: str = "",
    settled: bool = True,
    limiter_max_wait: float | None = WEB_LIMITER_WAIT_S,
) -> Portal:
    """Read the portal's bindings with a portal admin's token, bind again whatever is missing,
    and record what was found (`Portal.bindings`, `bindings_detail`, `bindings_checked_at`).

    `account_id` names the admin to act as (the sender of `ONAPPUPDATE`, the admin who pressed
    "Bind again"); otherwise an admin with working tokens is chosen. `settled=False` (right
    after an update, when Bitrix24 may still drop bindings) leaves the check due, so the next
    chance reads them again. `BitrixUnavailable` is raised for a retry (or, from a web request,
    a busy answer); other refusals are recorded. `limiter_max_wait` as for `account_client`."""
    from b24app.portals.selectors import portal_admin_account

    portal = Portal.objects.get(pk=portal_id)
    account = (
        Account.objects.select_related("portal").filter(pk=account_id, portal_id=portal_id).first()
        if account_id
        else portal_admin_account(portal)
    )
    if account is None or not account.is_admin:
        return _bindings_record(
            portal,
            portal.bindings,
            "No administrator of this portal has working tokens to check them with.",
            settled=False,
        )
    try:
        client = account_client(account, limiter_max_wait=limiter_max_wait)
        bound = bindings_read(client)
    except BitrixUnavailable:
        raise
    except BitrixError as exc:
        return _bindings_record(
            portal, portal.bindings, f"Bitrix24 did not list them ({exc.code}).", settled=False
        )
    base = (app_url or settings.B24_APP_URL or bound.app_url() or "").rstrip("/")
    if not base:
        return _bindings_record(
            portal,
            Portal.Bindings.MISSING,
            "None of the app's bindings is left and B24_APP_URL is not set: "
            "the app does not know its own address to bind them again.",
            settled=settled,
        )
    missing = bound.missing(base)
    failed = []
    for name in missing:
        try:
            binding_add(client, name, base)
        except BitrixUnavailable:
            raise
        except BitrixError as exc:
            failed.append(f"{name} ({exc.code})")
    if failed:
        state, detail = Portal.Bindings.MISSING, "Bitrix24 refused to bind " + ", ".join(failed)
    elif missing:
        state, detail = Portal.Bindings.REPAIRED, "Bound again: " + ", ".join(missing)
    else:
        state, detail = Portal.Bindings.OK, ""
    if missing:
        logger.warning(
            "bindings portal=%s missing=%s failed=%s",
            portal.member_id,
            ",".join(missing),
            ",".join(failed) or "-",
        )
    return _bindings_record(portal, state, detail, settled=settled)


def _bindings_record(portal: Portal, state: str, detail: str, *, settled: bool) -> Portal:
    portal.bindings = state
    portal.bindings_detail = detail[:300]
    portal.bindings_checked_at = timezone.now() if settled else None
    Portal.objects.filter(pk=portal.pk).update(
        bindings=portal.bindings,
        bindings_detail=portal.bindings_detail,
        bindings_checked_at=portal.bindings_checked_at,
    )
    return portal


def portal_bindings_check_later(
    *, portal_id: int, account_id: int | None = None, app_url: str = "", after_update=False
) -> None:
    """Queue a bindings check once the current transaction commits. After an app update: one
    right away, with the update's admin token (the bindings may be gone already), and one
    `BINDINGS_SETTLE_S` later (they may go only after the event); without a broker the later
    one is left to the next chance (the check stays due)."""
    from celery import current_app

    from b24app.portals.tasks import portal_bindings_check_task

    def queue() -> None:
        try:
            portal_bindings_check_task.delay(
                portal_id, account_id, app_url, settled=not after_update
            )
            if after_update and not current_app.conf.task_always_eager:
                portal_bindings_check_task.apply_async(
                    (portal_id, account_id, app_url), countdown=BINDINGS_SETTLE_S
                )
        except Exception as exc:  # noqa: BLE001 - broker down: the check stays due; the daily job does it
            logger.warning("could not queue a bindings check (%s)", type(exc).__name__)

    transaction.on_commit(queue)


# --- lifecycle events (`POST /b24/events/`) ----------------------------------------------------


@dataclass(frozen=True)
class EventOutcome:
    status: int
    code: str

    @property
    def accepted(self) -> bool:
        return self.status < 300


def _event_tokens(auth: dict, verified: VerifiedAuth, user_id: int) -> TokenSet | None:
    if not auth.get("refresh_token"):
        return None
    data = {**auth, "member_id": verified.member_id, "user_id": user_id}
    try:
        return TokenSet.from_response(data)
    except BitrixError:
        return None


def _event_sender(auth: dict, verified: VerifiedAuth) -> int:
    """The Bitrix24 user whose token a lifecycle event carries, who must be a portal admin:
    every user who opens the app holds a token the OAuth server vouches for, but only an admin
    installs or updates the app. Raises `VerificationFailed`."""
    client = _client(
        verified.client_endpoint,
        str(auth.get("access_token", "")),
        member_id=verified.member_id,
        rate=parse_rate(settings.B24_RATE_LIMIT),
        limiter_max_wait=WEB_LIMITER_WAIT_S,
    )
    try:
        profile = client.call("profile") or {}
    except BitrixUnavailable as exc:
        raise VerificationFailed(_("Bitrix24 is busy right now."), code="unavailable") from exc
    except BitrixError as exc:
        raise VerificationFailed(
            _("Bitrix24 did not confirm the authorization."), code="rejected"
        ) from exc
    user_id = parse_id(profile.get("ID")) or 0
    claimed = str(auth.get("user_id", "") or user_id)
    if not user_id or claimed != str(user_id) or verified.user_id not in (None, user_id):
        raise VerificationFailed(_("The event names another user."), code="mismatch")
    if not profile.get("ADMIN"):
        raise VerificationFailed(_("Only a Bitrix24 administrator can do this."), code="not_admin")
    return user_id


class Removal:
    """What the app's own tokens say about an `ONAPPUNINSTALL` (`_uninstall_verdict`)."""

    FORGED = "forged"
    """A token of the app still works: Bitrix24 revokes them all before it sends the event."""
    CONFIRMED = "confirmed"
    """A portal admin's token that was known to work is refused now."""
    UNCONFIRMED = "unconfirmed"
    """Nobody who may witness it could tell (no admin token, the OAuth server unreachable)."""


def _uninstall_verdict(portal: Portal) -> tuple[str, str]:
    """Whether Bitrix24 really removed the app, from the app's own tokens, with a detail line
    for the admin.

    `application_token` proves little (every user's frame POST carries it), so the app asks
    the OAuth server about tokens it holds. Any user's token that still works proves the app
    installed (forged). Only the installer's or a portal admin's token may confirm a removal
    (a plain user can hand in any `REFRESH_ID`, and an admin can remove the app anyway), and
    only a refusal that has no other explanation: an access token refused before its expiry,
    or a refresh token the OAuth server itself issued (or that came with a verified install)
    refused though it is not old and no renewal with it was lost. A failed refresh of any other
    token, no such account, or no answer proves nothing: unconfirmed."""
    from b24app.portals.selectors import portal_live_accounts, portal_uninstall_witnesses

    witnesses = portal_uninstall_witnesses(portal)
    witness_ids = {account.pk for account in witnesses}
    revoked: list[str] = []
    for account in [*witnesses, *portal_live_accounts(portal)]:
        if account.pk not in witness_ids and account.expires_at is None:
            continue
        said = _token_says(account, refresh=account.pk in witness_ids)
        if said == "works":
            return Removal.FORGED, f"user {account.user_id}'s token still works"
        if said == "refused" and account.pk in witness_ids:
            revoked.append(str(account.user_id))
        witness_ids.discard(account.pk)  # asked once, even when also among the live ones
    if revoked:
        return Removal.CONFIRMED, "refused the tokens of admin user " + ", ".join(revoked)
    if not witnesses:
        return Removal.UNCONFIRMED, "no installer's or portal admin's token to confirm it with"
    return Removal.UNCONFIRMED, "the OAuth server's answers did not confirm it"


REFRESH_TOKEN_DAYS = 180
"""How long Bitrix24 keeps an unused refresh token."""


def _token_says(account: Account, *, refresh: bool) -> str:
    """Ask the OAuth server about the account's tokens: "works", "refused" (a refusal that
    means revoked, see `_uninstall_verdict`) or "unknown"."""
    now = timezone.now()
    if account.access_token_encrypted and account.expires_at and account.expires_at > now:
        try:
            info = oauth_server().app_info(account.portal.oauth_server, account.access_token)
        except BitrixTokenExpired as exc:
            if exc.code != "expired_token":
                return "refused"  # invalid_token an hour early: revoked
        except BitrixUnavailable:
            return "unknown"
        except BitrixError as exc:
            if exc.code in REMOVED_CODES:
                return "refused"
            return "unknown"
        else:
            return "works" if _vouches_for(info, account.portal) else "unknown"
    if not refresh or not account.can_refresh:
        return "unknown"
    proven = not account.refresh_from_frame and account.refresh_unconfirmed_at is None
    if account.tokens_issued_at and account.tokens_issued_at < now - timedelta(
        days=REFRESH_TOKEN_DAYS - 1
    ):
        proven = False
    try:
        account_tokens_refresh(account_id=account.pk, seen_version=account.token_version)
    except (BitrixUnavailable, AccountAwaitingSignIn):
        return "unknown"
    except BitrixAuthError as exc:
        if exc.code in APP_CREDENTIAL_ERRORS:
            return "refused" if _credentials_work_elsewhere(account.portal) else "unknown"
        return "refused" if proven else "unknown"
    except BitrixError:
        return "unknown"
    return "works"


def _vouches_for(info: dict, portal: Portal) -> bool:
    """Whether an OAuth server's `app.info` answer vouches for this app installed on `portal`."""
    install = info.get("install") if isinstance(info.get("install"), dict) else {}
    return (
        str(info.get("client_id", "")) == bitrix_config().client_id
        and str(install.get("member_id", "")) == portal.member_id
        and bool(install.get("installed"))
    )


@transaction.atomic
def _uninstall_unconfirmed(portal: Portal, *, clean: bool, detail: str) -> None:
    """Keep everything and say so in the admin: the event may be forged."""
    portal = Portal.objects.select_for_update().get(pk=portal.pk)
    portal.uninstall_reported_at = timezone.now()
    portal.uninstall_report = (
        f"Bitrix24 reported the app removed{' (CLEAN requested)' if clean else ''}; "
        f"not confirmed: {detail}. Nothing was deleted"
    )[:300]
    portal.save(update_fields=["uninstall_reported_at", "uninstall_report", "updated_at"])


def _uninstall_report_clear(portal: Portal) -> None:
    """The app works on the portal after all: an unconfirmed uninstall report was not true."""
    if portal.uninstall_reported_at is not None:
        Portal.objects.filter(pk=portal.pk).update(uninstall_reported_at=None, uninstall_report="")
        portal.uninstall_reported_at, portal.uninstall_report = None, ""


def _event_digest(event: str, member_id: str, auth: dict) -> str:
    """What identifies one event: its name, portal and the credentials it carried.

    Bitrix24 sends each event with freshly issued tokens, so two different events never share a
    digest, and every copy of the same event does."""
    parts = [event, member_id] + [
        str(auth.get(name, "")) for name in ("application_token", "access_token", "refresh_token")
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _event_receipt_take(digest: str, event: str, member_id: str) -> bool:
    """Record the event as applied, inside the caller's transaction; False if it already was
    (a copy that raced this one committed first, and the unique digest tells)."""
    try:
        with transaction.atomic():
            EventReceipt.objects.create(digest=digest, event=event, member_id=member_id)
    except IntegrityError:
        return False
    return True


def event_receipts_purge(*, older_than_days: int = EVENT_RECEIPT_DAYS) -> int:
    """Forget receipts of events old enough that no copy of them is expected any more."""
    cutoff = timezone.now() - timedelta(days=older_than_days)
    deleted, _ = EventReceipt.objects.filter(received_at__lt=cutoff).delete()
    return deleted


def event_handle(*, event: str, data: dict, auth: dict, app_url: str = "") -> EventOutcome:
    """Apply an app lifecycle event once, after checking it came from Bitrix24.

    `ONAPPINSTALL`/`ONAPPUPDATE` carry a live access token: the OAuth server must vouch for it
    (client, portal, domain) and it must be a portal admin's before anything is stored.
    `ONAPPUNINSTALL` carries none (access is revoked first): it needs the constant-time
    `application_token` check, and our own tokens for the portal must have stopped working.
    A copy of an event already applied is answered `duplicate` and changes nothing: a late copy
    of an install must not put back tokens that were refreshed since. (Copies racing each other
    may each be verified with Bitrix24 before the unique receipt lets one of them apply.)
    """
    event = event.upper()
    member_id = str(auth.get("member_id", ""))
    if not is_member_id(member_id):
        return EventOutcome(401, "unknown_portal")
    digest = _event_digest(event, member_id, auth)
    if EventReceipt.objects.filter(digest=digest).exists():
        logger.info("%s copy portal=%s: already applied", event, member_id)
        return EventOutcome(200, "duplicate")
    if event == "ONAPPUNINSTALL":
        portal = Portal.objects.filter(member_id=member_id).first()
        if portal is None or not application_token_matches(
            portal, str(auth.get("application_token", ""))
        ):
            return EventOutcome(401, "invalid_application_token")
        verdict, detail = _uninstall_verdict(portal)
        clean = str(data.get("CLEAN", "0")).strip().lower() in ("1", "y", "true")
        if verdict == Removal.FORGED:
            logger.warning("ONAPPUNINSTALL refused portal=%s: %s", member_id, detail)
            return EventOutcome(401, "app_still_installed")
        if verdict == Removal.UNCONFIRMED:
            # Keep the data: a plain user knows APPLICATION_TOKEN. A genuine removal leaves the
            # tokens dead anyway; the operator confirms it in the admin.
            _uninstall_unconfirmed(portal, clean=clean, detail=detail)
            logger.warning("ONAPPUNINSTALL not confirmed portal=%s: %s", member_id, detail)
            return EventOutcome(202, "uninstall_unconfirmed")
        with transaction.atomic():
            if not _event_receipt_take(digest, event, member_id):
                return EventOutcome(200, "duplicate")
            portal_uninstall(portal=portal, clean=clean)
        logger.info("uninstalled portal=%s clean=%s", member_id, clean)
        return EventOutcome(200, "uninstalled")
    if event not in ("ONAPPINSTALL", "ONAPPUPDATE"):
        return EventOutcome(400, "unsupported_event")
    application_token = str(auth.get("application_token", ""))
    if not application_token:
        return EventOutcome(400, "missing_application_token")
    try:
        verified = auth_verify(
            access_token=str(auth.get("access_token", "")),
            member_id=member_id,
            domain=str(auth.get("domain", "")) or None,
            server_endpoint=str(auth.get("server_endpoint", "")) or None,
        )
        sender = _event_sender(auth, verified)
    except VerificationFailed as exc:
        status = 503 if exc.code in ("unavailable", "not_configured") else 401
        return EventOutcome(status, exc.code)
    tokens = _event_tokens(auth, verified, sender)
    with transaction.atomic():
        if not _event_receipt_take(digest, event, member_id):
            logger.info("%s copy portal=%s: already applied", event, member_id)
            return EventOutcome(200, "duplicate")
        portal = portal_upsert(verified=verified, application_token=application_token)
        account = None
        if tokens is not None:
            account = account_tokens_store(
                portal=portal,
                user_id=sender,
                tokens=tokens,
                is_installer=True if event == "ONAPPINSTALL" else None,
                is_admin=True,
            )
        if event == "ONAPPUPDATE":
            # Bitrix24 removes an app's event bindings when it is updated (event.bind docs):
            # bind them again with the update's admin token, now and once more a little later.
            portal_bindings_check_later(
                portal_id=portal.pk,
                account_id=account.pk if account is not None else None,
                app_url=app_url,
                after_update=True,
            )
    logger.info("%s applied portal=%s", event, member_id)
    return EventOutcome(200, event.lower())


# --- OAuth reconnect ---------------------------------------------------------------------------


def portal_reconnect(*, portal: Portal, code: str, operator: str) -> Account:
    """Finish the authorization-code flow an operator started: store the authorizing user's
    tokens as the portal's connection and make a portal blocked by a dead token active again.

    Only a portal admin may become the connection: `profile` is asked with the new access
    token, and anyone else is refused with nothing stored. A portal blocked by its operator
    stays blocked (the operator unblocks it explicitly, `portal_unblock`)."""
    if not code:
        raise PortalError(_("Bitrix24 sent no authorization code; start the reconnect again."))
    require_configured()
    try:
        tokens = oauth_server().exchange_code(portal.oauth_server, code)
    except BitrixError as exc:
        raise PortalError(f"Bitrix24 refused the authorization code ({exc.code}).") from exc
    if tokens.member_id != portal.member_id or not tokens.user_id:
        raise PortalError(_("Bitrix24 issued tokens for another portal; nothing was changed."))
    try:
        profile = _portal_client(
            portal, tokens.access_token, limiter_max_wait=WEB_LIMITER_WAIT_S
        ).call("profile")
    except BitrixUnavailable as exc:
        raise PortalError(BUSY_MESSAGE, code="unavailable") from exc
    except BitrixError as exc:
        raise PortalError(
            _("Bitrix24 did not tell who authorized the reconnect; nothing was changed.")
        ) from exc
    if not isinstance(profile, dict) or str(profile.get("ID", "")) != str(tokens.user_id):
        raise PortalError(
            _("Bitrix24 did not tell who authorized the reconnect; nothing was changed.")
        )
    if profile.get("ADMIN") is not True:
        logger.warning(
            "reconnect refused portal=%s user=%s by=%s error=not_admin",
            portal.member_id,
            tokens.user_id,
            operator,
        )
        raise PortalError(
            _(
                "Only a Bitrix24 administrator of this portal can reconnect it, and the user who "
                "authorized it is not one; nothing was changed. Log in to Bitrix24 as an "
                "administrator and start the reconnect again."
            ),
            code="not_admin",
        )
    with transaction.atomic():
        account = account_tokens_store(
            portal=portal,
            user_id=tokens.user_id,
            tokens=tokens,
            is_installer=True,
            is_admin=True,
            display_name=_profile_name(profile),
        )
        portal = Portal.objects.select_for_update().get(pk=portal.pk)
        if (
            portal.state in (Portal.State.BLOCKED, Portal.State.NEW)
            and not portal.blocked_by_operator
        ):
            portal.set_state(Portal.State.ACTIVE, f"reconnected via OAuth by {operator}")
            portal.save()
    logger.info("reconnected portal=%s user=%s by=%s", portal.member_id, tokens.user_id, operator)
    return account


# --- operator actions --------------------------------------------------------------------------


def portal_verify(*, portal: Portal) -> str:
    """Check the connection with `app.info` through the portal's connection account."""
    from b24app.portals.selectors import portal_connection_account

    account = portal_connection_account(portal)
    if account is None:
        raise PortalError(_("No user of this portal has working tokens; reconnect via OAuth."))
    try:
        info = account_client(account).call("app.info") or {}
    except BitrixError as exc:
        raise PortalError(f"Bitrix24 answered {exc.code}.") from exc
    Portal.objects.filter(pk=portal.pk).update(
        last_seen_at=timezone.now(), app_status=str(info.get("STATUS") or portal.app_status)[:1]
    )
    return "installed" if info.get("INSTALLED") else "not fully installed"


def portal_tokens_refresh(*, portal: Portal) -> tuple[int, int]:
    """Refresh every account of the portal through the locked service: (refreshed, failed)."""
    refreshed = failed = 0
    for account_id, version in (
        portal.accounts.filter(state=Account.State.ACTIVE)
        .exclude(refresh_token_encrypted="")
        .values_list("pk", "token_version")
    ):
        try:
            account_tokens_refresh(account_id=account_id, seen_version=version)
            refreshed += 1
        except BitrixError:
            failed += 1
    return refreshed, failed


# --- the embedded screen: placement POSTs and the frame session --------------------------------


class FrameRefused(PortalError):
    """A placement POST or frame request the app will not serve; `status` is the HTTP status."""

    def __init__(self, message, *, status: int = 403, code: str = "refused") -> None:
        super().__init__(message, code=code)
        self.status = status


def _portal_for_frame(post, domain: str | None) -> tuple[Portal, bool]:
    """The portal a placement POST claims to come from, once the claim is checked, and whether
    the OAuth server vouched for the POST's `AUTH_ID` on the way (`app.info`).

    A known portal whose `APPLICATION_TOKEN` and domain match is taken without `app.info`,
    unless it is marked uninstalled: then only `app.info` can say the app is there after all
    (a removal wrongly believed, or reinstalled), and a portal it vouches for is active again.
    """
    member_id = str(post.get("member_id", ""))
    access_token = str(post.get("AUTH_ID", ""))
    if not is_member_id(member_id):
        raise FrameRefused(
            _("This page must be opened from Bitrix24."), status=400, code="malformed"
        )
    if not access_token:  # REFRESH_ID is optional (§3.2): the access token is what is checked
        raise FrameRefused(_("Bitrix24 sent no authorization; reopen the app."), status=400)
    portal = Portal.objects.filter(member_id=member_id).first()
    if portal is not None:
        _refuse_blocked(portal)
        if (
            portal.state != Portal.State.UNINSTALLED
            and application_token_matches(portal, str(post.get("APPLICATION_TOKEN", "")))
            and domain in (None, portal.domain)
        ):
            return portal, False
    try:
        verified = _frame_verify(
            access_token=access_token,
            member_id=member_id,
            domain=domain,
            server_endpoint=str(post.get("SERVER_ENDPOINT", "")) or None,
        )
    except FrameRefused as exc:
        if portal is not None and exc.status == 403:
            _refuse_unusable(portal)
        raise
    if portal is None:
        return portal_upsert(verified=verified), True
    if portal.state == Portal.State.UNINSTALLED:
        if not verified.installed:
            _refuse_unusable(portal)
        logger.warning("portal=%s is installed after all, says app.info", portal.member_id)
        return portal_upsert(verified=verified), True
    if (portal.domain, portal.client_endpoint) != (verified.domain, verified.client_endpoint):
        portal_endpoint_update(portal_id=portal.pk, client_endpoint=verified.client_endpoint)
        portal.refresh_from_db()
    return portal, True


def _frame_verify(**claim) -> VerifiedAuth:
    """`auth_verify` for a frame: a refusal the frame shows (503 when Bitrix24 cannot answer)."""
    try:
        return auth_verify(**claim)
    except VerificationFailed as exc:
        status = 503 if exc.code in ("unavailable", "not_configured") else 403
        raise FrameRefused(exc.message, status=status, code=exc.code) from exc


def _refuse_blocked(portal: Portal) -> None:
    if portal.state == Portal.State.BLOCKED and portal.blocked_by_operator:
        raise FrameRefused(
            _("The app's connection to this Bitrix24 is blocked by its operator."), code="blocked"
        )


def _refuse_unusable(portal: Portal) -> None:
    if portal.state == Portal.State.UNINSTALLED:
        raise FrameRefused(
            _(
                "The app was removed from this Bitrix24. An administrator can install it again "
                "from the Bitrix24 Market."
            ),
            code="uninstalled",
        )
    _refuse_blocked(portal)


def _frame_profile(portal: Portal, access_token: str) -> dict:
    try:
        # Building the client checks the stored endpoint (SSRF guard): a private address, or a
        # name that does not resolve right now, is a refusal like any other, not a crash.
        client = _portal_client(portal, access_token, limiter_max_wait=WEB_LIMITER_WAIT_S)
        profile = client.call("profile")
    except BitrixUnavailable as exc:
        raise FrameRefused(
            _("Bitrix24 is busy right now; reopen the app in a minute."), status=503, code=exc.code
        ) from exc
    except BitrixError as exc:
        raise FrameRefused(
            _("Bitrix24 did not accept this session; reopen the app."), code=exc.code
        ) from exc
    if not isinstance(profile, dict) or not parse_id(profile.get("ID")):
        raise FrameRefused(
            _("Bitrix24 did not say who you are; reopen the app."), code="no_profile"
        )
    return profile


def _frame_tokenset(portal: Portal, user_id: int, access: str, refresh: str, expires_in: str):
    return TokenSet(
        access_token=access,
        refresh_token=refresh,
        expires_at=timezone.now() + timedelta(seconds=_parse_expires_in(expires_in)),
        scope="",
        member_id=portal.member_id,
        user_id=user_id,
        client_endpoint=portal.client_endpoint,
        server_endpoint=portal.oauth_server + "/rest/",
        status=portal.app_status,
    )


FRAME_TOKEN_MARGIN = timedelta(minutes=10)
"""A stored access token with less life than this left is replaced by a frame's fresh one."""


def _account_live(account: Account | None) -> bool:
    """Whether the account acts with tokens the app already trusts for a while yet."""
    return (
        account is not None
        and account.state == Account.State.ACTIVE
        and bool(account.access_token_encrypted)
        and account.expires_at is not None
        and account.expires_at > timezone.now() + FRAME_TOKEN_MARGIN
    )


def frame_account_open(*, post, domain: str | None) -> Account:
    """Verify a placement POST and return the account of the person who opened the frame.

    The portal is checked with its stored `APPLICATION_TOKEN` (constant time), or with the OAuth
    server's `app.info` when that is absent, different or the portal is new. Who the person is
    comes from `profile` with their own `AUTH_ID`.

    Their tokens become the account's only once `app.info` vouched that `AUTH_ID` was issued to
    this app: `profile` answers as well for a token of another app on the same portal. So an
    account that already acts with a trusted token for a while yet keeps it (the cheap path:
    no `app.info`); otherwise the token is vouched for and stored, which also repairs the
    account (and, for the installer, a portal blocked by a dead token). Its `REFRESH_ID` is
    optional, and one nobody has seen work (`_tokens_apply`); a visit without it does not repair
    a blocked portal: the portal needs a refresh token to act after the frame closes.
    """
    portal, vouched = _portal_for_frame(post, domain)
    access, refresh = str(post["AUTH_ID"]), str(post.get("REFRESH_ID", ""))
    profile = _frame_profile(portal, access)
    user_id = int(profile["ID"])
    account = Account.objects.filter(portal=portal, user_id=user_id).first()
    if not vouched and not _account_live(account):
        _frame_verify(
            access_token=access,
            member_id=portal.member_id,
            domain=None,
            server_endpoint=portal.oauth_server,
        )
        vouched = True
    with transaction.atomic():
        if vouched:
            account = account_tokens_store(
                portal=portal,
                user_id=user_id,
                tokens=_frame_tokenset(
                    portal, user_id, access, refresh, post.get("AUTH_EXPIRES", "")
                ),
                is_admin=bool(profile.get("ADMIN")),
                display_name=_profile_name(profile),
                from_frame=True,
            )
        else:
            account = _account_seen(account, profile)
        portal = Portal.objects.select_for_update().get(pk=portal.pk)
        if (
            portal.state in (Portal.State.BLOCKED, Portal.State.NEW)
            and not portal.blocked_by_operator
            and ((account.is_installer and account.can_refresh) or portal.state == Portal.State.NEW)
        ):
            portal.set_state(Portal.State.ACTIVE, "connection repaired by the app being opened")
        portal.last_seen_at = timezone.now()
        portal.save()
        _uninstall_report_clear(portal)  # the app's token just worked here
        if account.is_admin and portal_bindings_due(portal):
            # An admin is here with a fresh token: the day's check of the bindings (an app
            # update may have dropped them) goes with their visit.
            portal_bindings_check_later(portal_id=portal.pk, account_id=account.pk)
    account.portal = portal
    return account


def _account_seen(account: Account, profile: dict) -> Account:
    """The person opened the app again while their stored tokens hold: what `profile` says
    about them is remembered, their tokens are kept."""
    account.is_admin = bool(profile.get("ADMIN"))
    account.display_name = _stored_name(_profile_name(profile)) or account.display_name
    account.last_seen_at = timezone.now()
    account.save(update_fields=["is_admin", "display_name", "last_seen_at", "updated_at"])
    return account


def frame_session_renew(
    *, portal_id: int, account_id: int, access_token: str, refresh_token: str, expires_in: str
) -> Account:
    """Trade fresh frame auth (from BX24 `refreshAuth`) for the same account's new session.

    Only the access token is required and checked (`profile`); a renewal without a refresh
    token keeps the one the account has, as a placement POST without `REFRESH_ID` does."""
    account = (
        Account.objects.select_related("portal").filter(pk=account_id, portal_id=portal_id).first()
    )
    if account is None:
        raise FrameRefused(_("This session is no longer valid; reopen the app."), code="unknown")
    _refuse_unusable(account.portal)
    if not access_token:
        raise FrameRefused(_("Bitrix24 sent no authorization; reopen the app."), status=400)
    profile = _frame_profile(account.portal, access_token)
    if int(profile["ID"]) != account.user_id:
        raise FrameRefused(_("This session belongs to someone else; reopen the app."))
    if _account_live(account):
        return _account_seen(account, profile)
    _frame_verify(  # `profile` answers for another app's token too: only app.info tells
        access_token=access_token,
        member_id=account.portal.member_id,
        domain=None,
        server_endpoint=account.portal.oauth_server,
    )
    return account_tokens_store(
        portal=account.portal,
        user_id=account.user_id,
        tokens=_frame_tokenset(
            account.portal, account.user_id, access_token, refresh_token, expires_in
        ),
        is_admin=bool(profile.get("ADMIN")),
        from_frame=True,
    )
