"""The embedded screen: a placement POST verified and turned into the account of the person
who opened it, and the frame session's renewal."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals.bitrix import BitrixError, BitrixInvalidResponse, BitrixUnavailable, TokenSet
from b24app.portals.bitrix.methods import Profile, profile_get
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S
from b24app.portals.services.accounts import _stored_name, account_tokens_store
from b24app.portals.services.exceptions import FrameRefusal, FrameRefused, VerificationFailed
from b24app.portals.services.install import (
    _parse_expires_in,
    portal_bindings_check_later,
    portal_bindings_due,
)
from b24app.portals.services.portals import (
    _portal_client,
    _uninstall_report_clear,
    portal_endpoint_update,
    portal_upsert,
)
from b24app.portals.services.verification import (
    VerifiedAuth,
    application_token_matches,
    auth_verify,
    identity_recall,
    identity_remember,
    is_member_id,
)

logger = logging.getLogger("b24app.portals")


@dataclass(frozen=True)
class FrameOpened:
    """The account a placement POST speaks for, and whether the frame's tokens became its
    own (a new account, one repaired, or one whose stored token was about to run out): only
    then is the person back with fresh tokens for what waited for them."""

    account: Account
    tokens_stored: bool


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
            _("This page must be opened from Bitrix24."),
            reason=FrameRefusal.MALFORMED,
            code="malformed",
        )
    if not access_token:  # REFRESH_ID is optional (§3.2): the access token is what is checked
        raise FrameRefused(
            _("Bitrix24 sent no authorization; reopen the app."), reason=FrameRefusal.MALFORMED
        )
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
        if portal is not None and exc.reason is FrameRefusal.DENIED:
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
    """`auth_verify` for a frame: a refusal the frame shows (unavailable when Bitrix24 cannot
    answer, or the app has no credentials to ask with)."""
    try:
        return auth_verify(**claim)
    except VerificationFailed as exc:
        reason = (
            FrameRefusal.UNAVAILABLE
            if exc.code in ("unavailable", "not_configured")
            else FrameRefusal.DENIED
        )
        raise FrameRefused(exc.message, reason=reason, code=exc.code) from exc


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


def _frame_profile(portal: Portal, access_token: str) -> Profile:
    """Who the frame's access token belongs to (`profile`): a `Profile` with an id (not 0)."""
    try:
        # Building the client checks the stored endpoint (SSRF guard): a private address, or a
        # name that does not resolve right now, is a refusal like any other, not a crash.
        client = _portal_client(portal, access_token, limiter_max_wait=WEB_LIMITER_WAIT_S)
        profile = profile_get(client)
    except BitrixUnavailable as exc:
        raise FrameRefused(
            _("Bitrix24 is busy right now; reopen the app in a minute."),
            reason=FrameRefusal.UNAVAILABLE,
            code=exc.code,
        ) from exc
    except BitrixInvalidResponse:
        profile = None  # no object at all: as good as no id
    except BitrixError as exc:
        raise FrameRefused(
            _("Bitrix24 did not accept this session; reopen the app."), code=exc.code
        ) from exc
    if profile is None or not profile.id:  # none, or 0: no user
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


def frame_account_open(*, post, domain: str | None) -> FrameOpened:
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
    # The same AUTH_ID again within its lifetime: who it belongs to is known (`profile` said so
    # for this portal); the portal itself was checked again above.
    profile = identity_recall(portal.member_id, access)
    if profile is None:
        profile = _frame_profile(portal, access)
        identity_remember(portal.member_id, access, profile, post.get("AUTH_EXPIRES", ""))
    user_id = profile.id
    account = Account.objects.filter(portal=portal, user_id=user_id).first()
    if not vouched and not _account_live(account):
        _frame_verify(
            access_token=access,
            member_id=portal.member_id,
            domain=None,
            server_endpoint=portal.oauth_server,
        )
        vouched = True
    if not vouched and _portal_steady(portal, profile):
        # The common open: a known person with live tokens on an active portal. Two small
        # writes at most, and none when they were seen a moment ago.
        account = _account_seen(account, profile)
        _portal_seen(portal)
        account.portal = portal
        return FrameOpened(account, tokens_stored=False)
    with transaction.atomic():
        if vouched:
            account = account_tokens_store(
                portal=portal,
                user_id=user_id,
                tokens=_frame_tokenset(
                    portal, user_id, access, refresh, post.get("AUTH_EXPIRES", "")
                ),
                is_admin=profile.admin,
                display_name=profile.name,
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
    return FrameOpened(account, tokens_stored=vouched)


SEEN_EVERY = timedelta(minutes=1)
"""`last_seen_at` (an account's, a portal's) is written again on an open once it is this old:
it orders accounts and shows when a portal was last used, not each request."""


def _portal_steady(portal: Portal, profile: Profile) -> bool:
    """Whether the open has nothing to repair or start on the portal: it is active, no uninstall
    report waits to be cleared, and no bindings check is due with an admin here."""
    return (
        portal.state == Portal.State.ACTIVE
        and portal.uninstall_reported_at is None
        and not (profile.admin and portal_bindings_due(portal))
    )


def _portal_seen(portal: Portal) -> None:
    now = timezone.now()
    if portal.last_seen_at is None or now - portal.last_seen_at >= SEEN_EVERY:
        Portal.objects.filter(pk=portal.pk).update(last_seen_at=now)
        portal.last_seen_at = now


def _account_seen(account: Account, profile: Profile) -> Account:
    """The person opened the app again while their stored tokens hold: what `profile` says
    about them is remembered, their tokens are kept. Nothing is written when it says what the
    account holds and they were seen a moment ago."""
    now = timezone.now()
    name = _stored_name(profile.name) or account.display_name
    if (
        account.is_admin == profile.admin
        and account.display_name == name
        and account.last_seen_at is not None
        and now - account.last_seen_at < SEEN_EVERY
    ):
        return account
    account.is_admin = profile.admin
    account.display_name = name
    account.last_seen_at = now
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
        raise FrameRefused(
            _("Bitrix24 sent no authorization; reopen the app."), reason=FrameRefusal.MALFORMED
        )
    profile = _frame_profile(account.portal, access_token)
    if profile.id != account.user_id:
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
        is_admin=profile.admin,
        from_frame=True,
    )
