"""Frame requests: which account a signed frame token speaks for, and the portal admin's
connection actions started from the frame."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from django.utils.translation import gettext as _

from b24app.portals import frame
from b24app.portals.bitrix import BitrixError, BitrixUnavailable
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S
from b24app.portals.services import (
    FrameRefusal,
    FrameRefused,
    frame_account_open,
    frame_session_renew,
    portal_bindings_check,
)
from results.services.changes import result_changes_resume


@dataclass
class Frame:
    """A verified frame request: who, where, in which language."""

    account: Account
    token: str
    language: str

    @property
    def portal(self):
        return self.account.portal


def frame_resolve(token: str) -> Frame:
    """The frame session `token` carries; raises `FrameRefused` otherwise."""
    try:
        session = frame.read(token)
    except frame.FrameExpired as exc:
        raise FrameRefused(
            _("Your session in this window has expired. Reopen the app."),
            reason=FrameRefusal.EXPIRED,
            code="frame_expired",
        ) from exc
    except frame.FrameTokenError as exc:
        raise FrameRefused(
            _("This page must be opened from Bitrix24."), code="frame_invalid"
        ) from exc
    account = (
        Account.objects.select_related("portal")
        .filter(pk=session.account_id, portal_id=session.portal_id)
        .first()
    )
    if account is None or not account.has_tokens:
        raise FrameRefused(_("This session is no longer valid. Reopen the app."), code="frame_gone")
    if account.state == Account.State.WAITING:
        # The account's tokens were lost in transit: like an expired session, the open screen
        # renews it with fresh auth from the Bitrix24 frame (refreshAuth) and repeats the request.
        raise FrameRefused(
            _("Your session in this window has expired. Reopen the app."),
            reason=FrameRefusal.EXPIRED,
            code="frame_expired",
        )
    if account.portal.state == Portal.State.UNINSTALLED or account.portal.blocked_by_operator:
        raise FrameRefused(_("The app is not available on this Bitrix24."), code="portal_off")
    return Frame(account=account, token=token, language=session.language)


def frame_issue(account: Account, language: str, *, fresh_tokens: bool = True) -> Frame:
    """A new frame session of `account` (a placement just opened, or a session renewed). When
    the account's user is back with fresh tokens, their queued changes are due now
    (`result_changes_resume`)."""
    if fresh_tokens:
        result_changes_resume(account=account)
    token = frame.issue(frame.FrameSession(account.portal_id, account.pk, language))
    return Frame(account=account, token=token, language=language)


def frame_open(*, post, domain: str | None, language: str) -> Frame:
    """A placement POST from Bitrix24, verified (`frame_account_open`, which raises
    `FrameRefused`), as a new frame session of the person who opened it. An account that kept
    the tokens it had (they were live and trusted) had nothing waiting for its tokens: what
    waits for the portal goes when the portal answers again (`portal_answered`)."""
    opened = frame_account_open(post=post, domain=domain)
    return frame_issue(opened.account, language, fresh_tokens=opened.tokens_stored)


def frame_renew(*, token: str, access_token: str, refresh_token: str, expires_in: str) -> Frame:
    """An expired frame session traded with fresh frame auth (BX24 `refreshAuth`) for a new
    one of the same account. Raises `frame.FrameTokenError` for a token that was never ours,
    `FrameRefused` for auth the portal did not vouch for."""
    session = frame.read_for_renewal(token)
    account = frame_session_renew(
        portal_id=session.portal_id,
        account_id=session.account_id,
        access_token=access_token,
        refresh_token=refresh_token,
        expires_in=expires_in,
    )
    return frame_issue(account, session.language)


class Rebind(enum.Enum):
    """How a portal admin's "Bind again" ended."""

    BOUND = "bound"  # the Results tab and the app's events are bound
    MISSING = "missing"  # Bitrix24 did not bind everything (`Portal.bindings_detail` says what)
    BUSY = "busy"  # the portal's request budget is spoken for: nothing was checked
    NO_ANSWER = "no_answer"  # Bitrix24 did not answer
    NOT_ADMIN = "not_admin"  # only a Bitrix24 administrator may


@dataclass
class RebindOutcome:
    outcome: Rebind
    portal: Portal | None = None
    cause: BaseException | None = None


def portal_rebind(*, fr: Frame, app_url: str) -> RebindOutcome:
    """Check the portal's bindings as the frame's admin and bind again what is missing
    (`portal_bindings_check`), waiting for the portal's request budget no longer than a web
    request may. The frame's account sees the portal as recorded afterwards."""
    if not fr.account.is_admin:
        return RebindOutcome(Rebind.NOT_ADMIN)
    try:
        portal = portal_bindings_check(
            portal_id=fr.portal.pk,
            account_id=fr.account.pk,
            app_url=app_url,
            limiter_max_wait=WEB_LIMITER_WAIT_S,
        )
    except BitrixUnavailable as exc:
        # The portal's budget is spoken for (another admin's checks, a burst of edits): say so
        # at once rather than hold one of the threads every portal's screens are served by.
        return RebindOutcome(Rebind.BUSY, cause=exc)
    except BitrixError as exc:
        return RebindOutcome(Rebind.NO_ANSWER, cause=exc)
    fr.account.portal = portal
    if portal.bindings == Portal.Bindings.MISSING:
        return RebindOutcome(Rebind.MISSING, portal=portal)
    return RebindOutcome(Rebind.BOUND, portal=portal)
