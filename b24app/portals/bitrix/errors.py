"""Every error the Bitrix24 transport raises, and how an error response maps to one.

Errors are chosen by error code and HTTP status, never by message text (it is localised).
Server-provided text is redacted before it is put in an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from b24app.masking import redact

if TYPE_CHECKING:
    import requests

__all__ = [
    "ACCESS_DENIED_CODES",
    "AUTH_ERROR_CODES",
    "IDEMPOTENCY_KEY_REUSED",
    "TOKEN_EXPIRED_CODES",
    "UNAVAILABLE_CODES",
    "VALIDATION_CODES",
    "BitrixAccessDenied",
    "BitrixAuthError",
    "BitrixError",
    "BitrixInvalidResponse",
    "BitrixTokenExpired",
    "BitrixUnavailable",
    "BitrixValidationError",
    "UnsafeURL",
]

V3_PREFIX = "BITRIX_REST_V3_EXCEPTION_"
IDEMPOTENCY_KEY_REUSED = V3_PREFIX + "IDEMPOTENCYKEYREUSEDEXCEPTION"
"""422: the key was used with another body (§5.2) — which may be ours with a refreshed `auth`."""


class BitrixError(Exception):
    """Base of every error raised while talking to Bitrix24.

    ``code`` is the Bitrix24 error code (or a code of ours such as ``TIMEOUT``) and is what callers
    branch on; ``description`` is developer text and ``status`` the HTTP status when there was a
    response. Neither ever contains a token or secret: the transport redacts them before raising.
    """

    def __init__(self, code: str, description: str = "", *, status: int | None = None) -> None:
        super().__init__(code, description)
        self.code = code
        self.description = description
        self.status = status

    def __str__(self) -> str:
        where = f" (HTTP {self.status})" if self.status is not None else ""
        text = f": {self.description}" if self.description else ""
        return f"{self.code}{where}{text}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, "
            f"description={self.description!r})"
        )


class UnsafeURL(BitrixError):
    """A URL or peer address that must not receive a request (SSRF guard)."""


class BitrixUnavailable(BitrixError):
    """Bitrix24 cannot serve the request now; retry later (after ``retry_after`` seconds if set).

    ``operating_reset_at`` (Unix seconds) is set for ``OPERATION_TIME_LIMIT`` when known: the
    method is blocked for this app until then (§7.2).
    """

    def __init__(
        self,
        code: str,
        description: str = "",
        *,
        status: int | None = None,
        retry_after: float | None = None,
        operating_reset_at: int | None = None,
    ) -> None:
        super().__init__(code, description, status=status)
        self.retry_after = retry_after
        self.operating_reset_at = operating_reset_at


class BitrixAuthError(BitrixError):
    """The connection is dead (revoked, unpaid, uninstalled, bad refresh token): re-authorise."""


class BitrixTokenExpired(BitrixError):
    """The access token expired (``expired_token``/``invalid_token``) and no refresh was tried."""


class BitrixAccessDenied(BitrixError):
    """The token works but this user or app may not do this (rights, scope, auth type)."""


class BitrixInvalidResponse(BitrixError):
    """A success answer whose ``result`` has not the shape the method documents (code
    ``INVALID_RESPONSE``): a portal may answer anything."""


class BitrixValidationError(BitrixError):
    """Bitrix24 refused the request's content; ``validation`` lists ``{"field", "message"}``."""

    def __init__(
        self,
        code: str,
        description: str = "",
        *,
        status: int | None = None,
        validation: Iterable[Mapping[str, str | None]] = (),
    ) -> None:
        super().__init__(code, description, status=status)
        self.validation: list[dict[str, str | None]] = [
            {"field": entry.get("field"), "message": entry.get("message") or ""}
            for entry in validation
        ]

    def __str__(self) -> str:
        details = "; ".join(
            f"{entry['field']}: {entry['message']}" if entry["field"] else str(entry["message"])
            for entry in self.validation
        )
        return f"{super().__str__()} [{details}]" if details else super().__str__()


TOKEN_EXPIRED_CODES = frozenset({"expired_token", "invalid_token", "NO_AUTH_FOUND"})
"""Refresh the access token and repeat the call once (§2.3, §6.2). `NO_AUTH_FOUND` too: the
portal does not know this access token (it was revoked, or the portal lost it) while the
refresh token may still be good; a second refusal is the end (`BitrixAuthError`), and the
person's next frame brings a token the app takes instead."""

AUTH_ERROR_CODES = frozenset(
    {
        "invalid_grant",
        "bad_verification_code",
        "invalid_client",
        "wrong_client",
        "PAYMENT_REQUIRED",
        "PORTAL_DELETED",
        "NOT_INSTALLED",
        "APPLICATION_NOT_FOUND",
        "ERROR_OAUTH",
        "authorization_error",
    }
)
"""The connection is dead; a refresh does not help (§2.5, §6)."""

ACCESS_DENIED_CODES = frozenset(
    {
        "ACCESS_DENIED",
        "ACCESS_ERROR",
        "ALLOWED_ONLY_INTRANET_USER",
        "INVALID_CREDENTIALS",
        "INVALID_SCOPE",
        "invalid_scope",
        "insufficient_scope",
        "METHOD_CONFIRM_DENIED",
        "METHOD_CONFIRM_WAITING",
        "user_access_error",
        "WRONG_AUTH_TYPE",
        V3_PREFIX + "ACCESSDENIEDEXCEPTION",
        V3_PREFIX + "INSUFFICIENTSCOPEEXCEPTION",
    }
)

UNAVAILABLE_CODES = frozenset(
    {
        "QUERY_LIMIT_EXCEEDED",
        "OPERATION_TIME_LIMIT",
        "OVERLOAD_LIMIT",
        "INTERNAL_SERVER_ERROR",
        "ERROR_UNEXPECTED_ANSWER",
    }
)

VALIDATION_CODES = frozenset(
    {
        "ERROR_ARGUMENT",
        "INVALID_ARG_VALUE",
        "ERROR_BATCH_LENGTH_EXCEEDED",
        "100",  # classic "Invalid value … Should be value of type int" (§5.4)
        V3_PREFIX + "UNKNOWNDTOPROPERTYEXCEPTION",
        V3_PREFIX + "UNKNOWNFILTEROPERATOREXCEPTION",
        V3_PREFIX + "ENTITYNOTFOUNDEXCEPTION",
        IDEMPOTENCY_KEY_REUSED,
    }
)
"""Plus every v3 ``…_VALIDATION_…`` and ``…_INVALID…EXCEPTION`` code (see ``_error_class``)."""


def _error_class(code: str, status: int | None) -> type[BitrixError]:
    if code in TOKEN_EXPIRED_CODES:
        return BitrixTokenExpired
    if code in AUTH_ERROR_CODES:
        return BitrixAuthError
    if code in ACCESS_DENIED_CODES:
        return BitrixAccessDenied
    if code in UNAVAILABLE_CODES:
        return BitrixUnavailable
    if code in VALIDATION_CODES:
        return BitrixValidationError
    if code.startswith(V3_PREFIX):
        name = code.removeprefix(V3_PREFIX)
        if name.startswith("VALIDATION_") or (
            name.startswith("INVALID") and name.endswith("EXCEPTION")
        ):
            return BitrixValidationError
    if status is not None:
        if status >= 500 or status == 429:
            return BitrixUnavailable
        if status == 401:
            return BitrixAuthError
        if status == 403:
            return BitrixAccessDenied
    return BitrixError


@dataclass(frozen=True)
class _ErrorInfo:
    """An error response reduced to what the typed exceptions carry."""

    code: str
    status: int
    from_body: bool
    """``code`` came from the response body (otherwise it is ours, e.g. ``HTTP_502``)."""
    description: str = ""
    validation: tuple[dict[str, str | None], ...] = ()
    time: Mapping[str, Any] | None = None
    retry_after: float | None = None

    @classmethod
    def from_response(
        cls, response: requests.Response, body: Any, secrets: Iterable[str]
    ) -> _ErrorInfo | None:
        """``None`` for a success; both error shapes of §5.2 / §6 otherwise.

        A JSON ``error`` key is an error whatever the status (``wrong_client`` comes with 200).
        """
        status = response.status_code
        secrets = tuple(secrets)
        retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
        if not isinstance(body, dict):
            if 300 <= status < 400:
                code = "UNEXPECTED_REDIRECT"
            else:
                code = "INVALID_RESPONSE" if status < 300 else f"HTTP_{status}"
            return cls(code, status, from_body=False, retry_after=retry_after)
        error = body.get("error")
        if error in (None, ""):
            if status < 300:
                return None
            return cls(f"HTTP_{status}", status, from_body=False, retry_after=retry_after)
        if isinstance(error, dict):  # REST 3.0: {"error": {"code", "message", "validation"}}
            code = str(error.get("code") or "")
            description = str(error.get("message") or "")
            raw_validation = error.get("validation")
            entries = raw_validation if isinstance(raw_validation, list) else []
            validation = tuple(
                {
                    "field": None if entry.get("field") is None else str(entry["field"]),
                    "message": redact(str(entry.get("message") or ""), secrets),
                }
                for entry in entries
                if isinstance(entry, dict)
            )
        else:  # classic: {"error": "CODE", "error_description": "...", ["argument": "..."]}
            code = str(error)
            description = str(body.get("error_description") or "")
            argument = body.get("argument")
            validation = (
                ({"field": str(argument), "message": redact(description, secrets)},)
                if argument
                else ()
            )
        return cls(
            code or f"HTTP_{status}",
            status,
            from_body=bool(code),
            description=redact(description, secrets),
            validation=validation,
            time=_time_block(body),
            retry_after=retry_after,
        )

    def exception(self, *, operating_reset_at: int | None = None) -> BitrixError:
        """The typed exception for this error."""
        if self.from_body:
            error_class = _error_class(self.code, self.status)
        elif self.status >= 500 or self.status == 429:
            error_class = BitrixUnavailable
        else:  # no error code: the status alone does not say what went wrong
            error_class = BitrixError
        if error_class is BitrixUnavailable:
            retry_after = self.retry_after
            if retry_after is None and operating_reset_at is not None:
                retry_after = max(0.0, operating_reset_at - time.time())
            return BitrixUnavailable(
                self.code,
                self.description,
                status=self.status,
                retry_after=retry_after,
                operating_reset_at=operating_reset_at,
            )
        if error_class is BitrixValidationError:
            return BitrixValidationError(
                self.code, self.description, status=self.status, validation=self.validation
            )
        return error_class(self.code, self.description, status=self.status)


def _time_block(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    block = body.get("time")
    return block if isinstance(block, dict) else None


def _retry_after_seconds(header: str | None) -> float | None:
    if not header:
        return None
    try:
        seconds = float(header)
    except ValueError:
        try:
            moment = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        seconds = (moment - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _has_error_code(body: Any) -> bool:
    """Is this a Bitrix24 error body (either shape of §5.2 / §6)?"""
    return isinstance(body, dict) and body.get("error") not in (None, "")
