"""The results screen's HTTP side: how a domain outcome becomes a status, and the headers every
frame answer carries. The one place outcomes and exceptions of `results.services` map to HTTP
statuses."""

from __future__ import annotations

from django.http import JsonResponse
from django.shortcuts import render

from b24app.framing import allow_portal_framing, claimed_portal_origin, policy_replace
from b24app.portals.ratelimit import busy_retry_after_s
from b24app.portals.services import FrameRefusal, FrameRefused
from results.services import (
    ChangeNotFound,
    Frame,
    QueueFull,
    Rebind,
    ResultError,
    ScreenUnavailable,
    Unreadable,
)

# The screen's own policy: its scripts, styles and requests come from this app only. Frame
# ancestors are the settings' default ('none') or, for a verified frame, the portal's origin.
SCREEN_POLICY = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "form-action": ["'self'"],
    "base-uri": ["'none'"],
    "object-src": ["'none'"],
}

UNREADABLE_STATUS = {
    Unreadable.SIGNED_OUT: 503,
    Unreadable.BUSY: 503,
    Unreadable.FAILED: 503,
    Unreadable.NO_ACCESS: 403,
    Unreadable.SESSION_ENDED: 403,
    Unreadable.NOT_FOUND: 404,
}
REBIND_STATUS = {
    Rebind.BOUND: 200,
    Rebind.MISSING: 502,
    Rebind.BUSY: 503,
    Rebind.NO_ANSWER: 502,
    Rebind.NOT_ADMIN: 403,
}

REFUSAL_STATUS = {
    FrameRefusal.MALFORMED: 400,
    FrameRefusal.EXPIRED: 401,  # the page renews the session with fresh frame auth
    FrameRefusal.DENIED: 403,
    FrameRefusal.UNAVAILABLE: 503,
}


def status_of(outcome: BaseException | Rebind) -> int:
    """The HTTP status of a service's outcome or refusal."""
    if isinstance(outcome, Rebind):
        return REBIND_STATUS[outcome]
    if isinstance(outcome, FrameRefused):
        return REFUSAL_STATUS[outcome.reason]
    if isinstance(outcome, ScreenUnavailable):
        return UNREADABLE_STATUS[outcome.reason]
    if isinstance(outcome, QueueFull):
        return 429
    if isinstance(outcome, ChangeNotFound):
        return 404
    if isinstance(outcome, ResultError):
        return 400
    raise TypeError(f"no HTTP status for {outcome!r}")


def wants_json(request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def framed(response, fr: Frame | None):
    policy_replace(response, SCREEN_POLICY)
    response["Cache-Control"] = "no-store"
    response["Referrer-Policy"] = "no-referrer"
    if fr is not None:
        allow_portal_framing(response, fr.portal.origin)
    return response


def busy(response, cause: BaseException | None = None):
    """A 503 says when to try again (`Retry-After`): when the portal's request budget has a
    slot, as far as the limiter or Bitrix24 said, else a few seconds. A web request waits at
    most `WEB_LIMITER_WAIT_S` for a slot and answers this instead of holding a thread."""
    if response.status_code == 503:
        response["Retry-After"] = str(busy_retry_after_s(cause))
    return response


def refused(
    request,
    message,
    status: int,
    fr: Frame | None = None,
    *,
    code: str = "refused",
    cause: BaseException | None = None,
):
    if wants_json(request):
        response = JsonResponse({"error": code, "message": str(message)}, status=status)
        return busy(framed(response, fr), cause)
    response = framed(
        render(request, "results/refused.html", {"message": message}, status=status), fr
    )
    claimed = claimed_portal_origin(request)
    if fr is None and claimed:
        allow_portal_framing(response, claimed)
    return busy(response, cause)
