"""The errors portal services raise, with what a person may be shown."""

from __future__ import annotations

import enum

from django.utils.translation import gettext_lazy as _

from b24app.portals import crypto
from b24app.portals.bitrix import BitrixUnavailable

AWAITING_SIGN_IN_RETRY_S = 300.0
"""Work as a user whose account waits for their next visit is retried after this long."""


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


class AccountAwaitingSignIn(BitrixUnavailable):
    """The account waits for its user's next visit to get tokens again (`Account.State.WAITING`).

    A kind of "unavailable": work done as this user is retried later, not refused, and no token
    call is made meanwhile."""

    CODE = "ACCOUNT_AWAITING_SIGN_IN"

    def __init__(self, reason: str) -> None:
        super().__init__(self.CODE, reason, retry_after=AWAITING_SIGN_IN_RETRY_S)


class FrameRefusal(enum.Enum):
    """Why a placement POST or frame request is refused (`FrameRefused.reason`); the views say
    which HTTP status each becomes."""

    MALFORMED = "malformed"
    """Not a request Bitrix24 sends: no member_id of the right form, no authorization."""
    DENIED = "denied"
    """Not vouched for, or not allowed: another app's token, a removed app, a blocked portal."""
    EXPIRED = "expired"
    """The frame session ran out; fresh auth from the Bitrix24 frame renews it."""
    UNAVAILABLE = "unavailable"
    """Bitrix24 (or its OAuth server) cannot answer right now; the same request may work later."""


class FrameRefused(PortalError):
    """A placement POST or frame request the app will not serve: why (`reason`), and a finer
    `code` for logs and the page's script."""

    def __init__(
        self, message, *, reason: FrameRefusal = FrameRefusal.DENIED, code: str = "refused"
    ) -> None:
        super().__init__(message, code=code)
        self.reason = reason


BUSY_MESSAGE = _("Bitrix24 is busy right now. Try again in a minute.")
"""What a person reads when a web request found the portal's request budget spoken for."""


class ReencryptStopped(crypto.TokenKeyError):
    """A stored token no key of B24_TOKEN_KEYS decrypts stopped `accounts_reencrypt`; `done`
    accounts, in the batches before, were re-encrypted already."""

    def __init__(self, message: str, *, done: int) -> None:
        super().__init__(message)
        self.done = done
