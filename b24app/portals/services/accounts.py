"""The token store: a user's tokens stored, refreshed race-free under a row lock, the REST
client acting as that user."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import OperationalError, connection, transaction
from django.utils import timezone

from b24app import metrics
from b24app.portals import crypto
from b24app.portals.bitrix import (
    BitrixAuthError,
    BitrixClient,
    BitrixError,
    BitrixUnavailable,
    TokenSet,
    UnsafeURL,
)
from b24app.portals.bitrix.methods import trusted_app_info_parse
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S
from b24app.portals.services.clients import bitrix_config, oauth_server
from b24app.portals.services.exceptions import AccountAwaitingSignIn, ReencryptStopped
from b24app.portals.services.portals import _portal_client

logger = logging.getLogger("b24app.portals")


REFRESH_LOCK_MARGIN_S = 5.0
LOCK_NOT_AVAILABLE = "55P03"
"""PostgreSQL's SQLSTATE for a lock wait that ran out (`lock_timeout`)."""
REFRESH_BUSY_RETRY_S = 5.0

APP_CREDENTIAL_ERRORS = frozenset({"invalid_client", "wrong_client"})
"""OAuth-server answers about the app's own credentials, never about one user's token."""


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
    metrics.token_refreshed(failure)
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
    vouched = trusted_app_info_parse(info)
    if vouched.member_id == account.portal.member_id and vouched.installed:
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


def _stored_name(name: str) -> str:
    """A person's name as `Account.display_name` holds it (no NUL, at most 255 characters)."""
    return name.replace("\x00", "")[:255]


REENCRYPT_BATCH = 500
"""Accounts `accounts_reencrypt` locks and rewrites in one transaction."""


def accounts_reencrypt(*, batch: int = REENCRYPT_BATCH) -> int:
    """Re-encrypt every account's tokens under the first of B24_TOKEN_KEYS (`b24 rotate-keys`);
    the number of accounts re-encrypted.

    `batch` accounts at a time, in id order, each batch in a short transaction of its own that
    locks only those accounts: a token refresh waits for one batch at most, never for the whole
    run. A token no key decrypts raises `ReencryptStopped`; its batch is left as it was, and the
    batches before it stay re-encrypted (the same keys read them)."""
    done, after = 0, 0
    while True:
        try:
            with transaction.atomic():
                accounts = list(
                    Account.objects.select_for_update()
                    .filter(pk__gt=after)
                    .exclude(access_token_encrypted="", refresh_token_encrypted="")
                    .order_by("pk")[:batch]
                )
                for account in accounts:
                    account.access_token_encrypted = crypto.reencrypt(
                        account.access_token_encrypted
                    )
                    account.refresh_token_encrypted = crypto.reencrypt(
                        account.refresh_token_encrypted
                    )
                Account.objects.bulk_update(
                    accounts, ["access_token_encrypted", "refresh_token_encrypted"]
                )
        except crypto.TokenKeyError as exc:
            raise ReencryptStopped(str(exc), done=done) from exc
        if not accounts:
            return done
        done += len(accounts)
        after = accounts[-1].pk
