"""The install wizard (`POST /b24/install/`) and the app's bindings on a portal (its tab and
event handlers): checked, and bound again when missing."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals import bindings
from b24app.portals.bindings import binding_add, bindings_ensure, bindings_read
from b24app.portals.bitrix import BitrixError, BitrixUnavailable, TokenSet
from b24app.portals.bitrix.methods import profile_get
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S
from b24app.portals.selectors import portal_admin_account
from b24app.portals.services.accounts import account_client, account_tokens_store
from b24app.portals.services.clients import request_client
from b24app.portals.services.exceptions import BUSY_MESSAGE, PortalError
from b24app.portals.services.portals import portal_upsert
from b24app.portals.services.verification import VerifiedAuth, auth_verify

logger = logging.getLogger("b24app.portals")


BINDINGS_SETTLE_S = 120.0
"""After an app update, its bindings are checked again this long after its event: Bitrix24 may
drop them after the event was delivered as well as before."""


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
    client = request_client(
        verified.client_endpoint, tokens.access_token, member_id=verified.member_id
    )
    try:
        profile = profile_get(client)
    except BitrixUnavailable as exc:
        raise PortalError(BUSY_MESSAGE, code="unavailable") from exc
    except BitrixError as exc:  # a non-object answer too (`BitrixInvalidResponse`)
        raise PortalError(_("Bitrix24 did not tell who is installing the app; try again.")) from exc
    # Who installs is who `profile` names: an odd ID ("²") is no one, not app.info's user_id,
    # since the `ADMIN` beside it speaks for the profile's user.
    user_id = profile.id or 0
    if not user_id:
        raise PortalError(_("Bitrix24 did not tell who is installing the app; try again."))
    if not profile.admin:  # JSON `true` only: a portal's "N" or "0" is no administrator
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
            display_name=profile.name,
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
