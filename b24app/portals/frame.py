"""The cookieless session of the embedded screen.

Inside the Bitrix24 iframe our site is third-party: Safari, Firefox and private windows drop its
cookies. So after a verified placement POST the app issues a short-lived signed token bound to
(portal, account, language) that the page sends with every request (the `X-Frame-Token` header
or a `frame_token` form field). Forging one needs the frame signing key (`B24_FRAME_SIGNING_KEY`,
else derived from DJANGO_SECRET_KEY; a weak one is a start-up error); it names one portal and
one account, so it can neither act for another user nor reach another tenant, and since a
cross-site attacker cannot read it, it doubles as CSRF protection for frame requests.

An expired token is refused with `FrameExpired`; the page then asks the Bitrix24 frame for fresh
auth and trades it for a new token (`b24app.portals.services.frame_session_renew`), or tells the
person to reopen the app. It never falls back to anything the browser sends unsigned.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.core import signing

SALT = "b24app.portals.frame"
TTL_SECONDS = 30 * 60
RENEW_WINDOW_SECONDS = 12 * 60 * 60
"""An expired token still names who to renew for (with fresh Bitrix24 auth) for this long."""
HEADER = "HTTP_X_FRAME_TOKEN"
FIELD = "frame_token"


class FrameTokenError(Exception):
    code = "frame_invalid"


class FrameExpired(FrameTokenError):
    code = "frame_expired"


@dataclass(frozen=True)
class FrameSession:
    portal_id: int
    account_id: int
    language: str


def issue(session: FrameSession) -> str:
    return signing.dumps(
        {"p": session.portal_id, "a": session.account_id, "l": session.language},
        key=settings.B24_FRAME_SIGNING_KEY,
        salt=SALT,
        compress=False,
    )


def _load(token: str, max_age: int) -> FrameSession:
    payload = signing.loads(token, key=settings.B24_FRAME_SIGNING_KEY, salt=SALT, max_age=max_age)
    try:
        return FrameSession(int(payload["p"]), int(payload["a"]), str(payload.get("l", "en")))
    except (KeyError, TypeError, ValueError) as exc:
        raise FrameTokenError("malformed frame token") from exc


def read(token: str) -> FrameSession:
    """The session a live token names; `FrameExpired` or `FrameTokenError` otherwise."""
    if not token:
        raise FrameTokenError("no frame token")
    try:
        return _load(token, TTL_SECONDS)
    except signing.SignatureExpired as exc:
        raise FrameExpired("frame token expired") from exc
    except signing.BadSignature as exc:
        raise FrameTokenError("bad frame token") from exc


def read_for_renewal(token: str) -> FrameSession:
    """The session an expired (but genuine and recent) token names, to renew it."""
    try:
        return _load(token, RENEW_WINDOW_SECONDS)
    except signing.BadSignature as exc:
        raise FrameTokenError("bad frame token") from exc


def from_request(request) -> str:
    return request.META.get(HEADER) or request.POST.get(FIELD, "") or ""
