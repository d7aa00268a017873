"""App lifecycle events (`POST /b24/events/`): checked, applied once (receipts), and the
verdict on an `ONAPPUNINSTALL` from the app's own tokens."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals.bitrix import (
    BitrixAuthError,
    BitrixError,
    BitrixTokenExpired,
    BitrixUnavailable,
    TokenSet,
)
from b24app.portals.bitrix.methods import profile_get, trusted_app_info_parse
from b24app.portals.models import Account, EventReceipt, Portal
from b24app.portals.selectors import portal_live_accounts, portal_uninstall_witnesses
from b24app.portals.services.accounts import (
    APP_CREDENTIAL_ERRORS,
    REMOVED_CODES,
    _credentials_work_elsewhere,
    account_tokens_refresh,
    account_tokens_store,
)
from b24app.portals.services.clients import bitrix_config, oauth_server, request_client
from b24app.portals.services.exceptions import AccountAwaitingSignIn, VerificationFailed
from b24app.portals.services.install import portal_bindings_check_later
from b24app.portals.services.portals import portal_uninstall, portal_upsert
from b24app.portals.services.verification import (
    VerifiedAuth,
    application_token_matches,
    auth_verify,
    is_member_id,
)

logger = logging.getLogger("b24app.portals")


EVENT_RECEIPT_DAYS = 7
"""How long an applied event is remembered against copies of it (retrying proxies, replays)."""


class EventKind:
    """What became of a lifecycle event, for its sender (`EventOutcome.kind`)."""

    APPLIED = "applied"
    """Applied now, or already (a copy)."""
    UNCONFIRMED = "unconfirmed"
    """Taken note of and nothing changed: an uninstall the app's tokens do not confirm."""
    MALFORMED = "malformed"
    """Not an event this app takes."""
    REFUSED = "refused"
    """Not shown to come from Bitrix24."""
    UNAVAILABLE = "unavailable"
    """Could not be checked now (Bitrix24 busy, the app not configured): a resend may be."""


@dataclass(frozen=True)
class EventOutcome:
    kind: str
    """One of `EventKind`."""
    code: str

    @property
    def accepted(self) -> bool:
        return self.kind in (EventKind.APPLIED, EventKind.UNCONFIRMED)


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
    client = request_client(
        verified.client_endpoint, str(auth.get("access_token", "")), member_id=verified.member_id
    )
    try:
        profile = profile_get(client)
    except BitrixUnavailable as exc:
        raise VerificationFailed(_("Bitrix24 is busy right now."), code="unavailable") from exc
    except BitrixError as exc:
        raise VerificationFailed(
            _("Bitrix24 did not confirm the authorization."), code="rejected"
        ) from exc
    user_id = profile.id or 0
    claimed = str(auth.get("user_id", "") or user_id)
    if not user_id or claimed != str(user_id) or verified.user_id not in (None, user_id):
        raise VerificationFailed(_("The event names another user."), code="mismatch")
    if not profile.admin:
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
    return trusted_app_info_parse(info).vouches_for(
        client_id=bitrix_config().client_id, member_id=portal.member_id
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
        return EventOutcome(EventKind.REFUSED, "unknown_portal")
    digest = _event_digest(event, member_id, auth)
    if EventReceipt.objects.filter(digest=digest).exists():
        logger.info("%s copy portal=%s: already applied", event, member_id)
        return EventOutcome(EventKind.APPLIED, "duplicate")
    if event == "ONAPPUNINSTALL":
        portal = Portal.objects.filter(member_id=member_id).first()
        if portal is None or not application_token_matches(
            portal, str(auth.get("application_token", ""))
        ):
            return EventOutcome(EventKind.REFUSED, "invalid_application_token")
        verdict, detail = _uninstall_verdict(portal)
        clean = str(data.get("CLEAN", "0")).strip().lower() in ("1", "y", "true")
        if verdict == Removal.FORGED:
            logger.warning("ONAPPUNINSTALL refused portal=%s: %s", member_id, detail)
            return EventOutcome(EventKind.REFUSED, "app_still_installed")
        if verdict == Removal.UNCONFIRMED:
            # Keep the data: a plain user knows APPLICATION_TOKEN. A genuine removal leaves the
            # tokens dead anyway; the operator confirms it in the admin.
            _uninstall_unconfirmed(portal, clean=clean, detail=detail)
            logger.warning("ONAPPUNINSTALL not confirmed portal=%s: %s", member_id, detail)
            return EventOutcome(EventKind.UNCONFIRMED, "uninstall_unconfirmed")
        with transaction.atomic():
            if not _event_receipt_take(digest, event, member_id):
                return EventOutcome(EventKind.APPLIED, "duplicate")
            portal_uninstall(portal=portal, clean=clean)
        logger.info("uninstalled portal=%s clean=%s", member_id, clean)
        return EventOutcome(EventKind.APPLIED, "uninstalled")
    if event not in ("ONAPPINSTALL", "ONAPPUPDATE"):
        return EventOutcome(EventKind.MALFORMED, "unsupported_event")
    application_token = str(auth.get("application_token", ""))
    if not application_token:
        return EventOutcome(EventKind.MALFORMED, "missing_application_token")
    try:
        verified = auth_verify(
            access_token=str(auth.get("access_token", "")),
            member_id=member_id,
            domain=str(auth.get("domain", "")) or None,
            server_endpoint=str(auth.get("server_endpoint", "")) or None,
        )
        sender = _event_sender(auth, verified)
    except VerificationFailed as exc:
        unavailable = exc.code in ("unavailable", "not_configured")
        return EventOutcome(EventKind.UNAVAILABLE if unavailable else EventKind.REFUSED, exc.code)
    tokens = _event_tokens(auth, verified, sender)
    with transaction.atomic():
        if not _event_receipt_take(digest, event, member_id):
            logger.info("%s copy portal=%s: already applied", event, member_id)
            return EventOutcome(EventKind.APPLIED, "duplicate")
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
    return EventOutcome(EventKind.APPLIED, event.lower())
