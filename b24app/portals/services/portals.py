"""Writes about a portal's own row: install state, its address, an operator's block, the
app's removal; and the REST client for a stored portal."""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from b24app.portals import crypto
from b24app.portals.bitrix import BitrixClient
from b24app.portals.models import Account, Portal
from b24app.portals.services.clients import _client, portal_rate
from b24app.portals.services.exceptions import VerificationFailed
from b24app.portals.services.verification import VerifiedAuth, auth_verify

logger = logging.getLogger("b24app.portals")


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


def _portal_client(
    portal: Portal, access_token: str, *, limiter_max_wait: float | None, on_expired=None
) -> BitrixClient:
    """A REST client for a stored portal: a domain change the portal answers with is
    remembered once the OAuth server confirms it (`portal_address_confirm`)."""
    portal_id = portal.pk

    def on_domain_change(endpoint: str, access_token: str) -> None:
        portal_address_confirm(
            portal_id=portal_id, client_endpoint=endpoint, access_token=access_token
        )

    return _client(
        portal.client_endpoint,
        access_token,
        member_id=portal.member_id,
        rate=portal_rate(portal),
        limiter_max_wait=limiter_max_wait,
        on_domain_change=on_domain_change,
        on_expired=on_expired,
    )


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


def _uninstall_report_clear(portal: Portal) -> None:
    """The app works on the portal after all: an unconfirmed uninstall report was not true."""
    if portal.uninstall_reported_at is not None:
        Portal.objects.filter(pk=portal.pk).update(uninstall_reported_at=None, uninstall_report="")
        portal.uninstall_reported_at, portal.uninstall_report = None, ""
