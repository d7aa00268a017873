"""What an operator does about a portal from the admin: the OAuth reconnect, a connection
check, a token refresh."""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals.bitrix import BitrixError, BitrixUnavailable
from b24app.portals.bitrix.methods import app_info_get, profile_get
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S
from b24app.portals.selectors import portal_connection_account
from b24app.portals.services.accounts import (
    account_client,
    account_tokens_refresh,
    account_tokens_store,
)
from b24app.portals.services.clients import oauth_server, require_configured
from b24app.portals.services.exceptions import BUSY_MESSAGE, PortalError
from b24app.portals.services.portals import _portal_client

logger = logging.getLogger("b24app.portals")


def portal_reconnect_start(*, portal: Portal, state: str) -> str:
    """Where an operator's browser goes to start a reconnect: the portal's OAuth authorization
    page, carrying the signed `state` back to the callback. Raises `PortalError`."""
    require_configured()
    try:
        return oauth_server().authorize_url(portal.base_url, state)
    except BitrixError as exc:
        raise PortalError(str(exc)) from exc


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
        profile = profile_get(
            _portal_client(portal, tokens.access_token, limiter_max_wait=WEB_LIMITER_WAIT_S)
        )
    except BitrixUnavailable as exc:
        raise PortalError(BUSY_MESSAGE, code="unavailable") from exc
    except BitrixError as exc:
        raise PortalError(
            _("Bitrix24 did not tell who authorized the reconnect; nothing was changed.")
        ) from exc
    if profile.id != tokens.user_id:
        raise PortalError(
            _("Bitrix24 did not tell who authorized the reconnect; nothing was changed.")
        )
    if not profile.admin:
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
            display_name=profile.name,
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


def portal_verify(*, portal: Portal) -> str:
    """Check the connection with `app.info` through the portal's connection account."""
    account = portal_connection_account(portal)
    if account is None:
        raise PortalError(_("No user of this portal has working tokens; reconnect via OAuth."))
    try:
        info = app_info_get(account_client(account))
    except BitrixError as exc:
        raise PortalError(f"Bitrix24 answered {exc.code}.") from exc
    Portal.objects.filter(pk=portal.pk).update(
        last_seen_at=timezone.now(), app_status=(info.status or portal.app_status)[:1]
    )
    return "installed" if info.installed else "not fully installed"


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
