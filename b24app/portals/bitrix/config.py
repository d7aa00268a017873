"""App-wide settings of the Bitrix24 transport and the tokens a token response carries."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from b24app.masking import mask_secret
from b24app.portals.bitrix.constants import DEFAULT_OAUTH_SERVERS
from b24app.portals.bitrix.errors import BitrixError, UnsafeURL
from b24app.portals.bitrix.netguard import parse_origin

__all__ = ["BitrixConfig", "TokenMethod", "TokenSet"]


@dataclass(frozen=True, repr=False)
class BitrixConfig:
    """App-wide settings of the Bitrix24 transport, from ``B24_*`` env vars (docs/OPERATIONS.md).

    ``oauth_servers`` (``B24_OAUTH_SERVERS``) is normalised to bare origins; a comma-separated
    string is accepted. ``allow_private`` is ``B24_ALLOW_PRIVATE_PORTALS``.

    ``deadline`` (``B24_HTTP_DEADLINE``) bounds one exchange on the wall clock: connecting,
    sending and reading the whole answer. ``max_body_bytes`` (``B24_HTTP_MAX_BODY``) is the
    largest answer read; a longer one is refused and its connection closed.
    """

    client_id: str
    client_secret: str
    oauth_servers: tuple[str, ...] = DEFAULT_OAUTH_SERVERS
    allow_private: bool = False
    connect_timeout: float = 3.05
    read_timeout: float = 20.0
    user_agent: str = "b24-results/0.1"
    deadline: float = 25.0
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.deadline, int | float) and math.isfinite(self.deadline)):
            raise ValueError("deadline must be a number of seconds")
        if self.deadline <= 0:
            raise ValueError("deadline must be a positive number of seconds")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be a positive whole number of bytes")
        servers = self.oauth_servers
        if isinstance(servers, str):
            servers = tuple(part for part in servers.split(",") if part.strip())
        origins = tuple(
            _bare_origin(server.strip(), allow_http=self.allow_private, paths=("", "/"))
            for server in servers
        )
        object.__setattr__(self, "oauth_servers", origins)

    @property
    def timeout(self) -> tuple[float, float]:
        """``(connect, read)`` timeout for ``requests``."""
        return (self.connect_timeout, self.read_timeout)

    def __repr__(self) -> str:
        return (
            f"BitrixConfig(client_id={self.client_id!r}, "
            f"client_secret={mask_secret(self.client_secret)!r}, "
            f"oauth_servers={self.oauth_servers!r}, allow_private={self.allow_private!r}, "
            f"connect_timeout={self.connect_timeout!r}, read_timeout={self.read_timeout!r}, "
            f"user_agent={self.user_agent!r}, deadline={self.deadline!r}, "
            f"max_body_bytes={self.max_body_bytes!r})"
        )


TokenMethod = Literal["post", "get"]
"""How a request to the OAuth server's ``/oauth/token/`` travels: ``"post"``, the parameters in
an ``application/x-www-form-urlencoded`` body (tried first: no secret in a URL), or ``"get"``,
the parameters in the query string (as the docs' examples and two official SDKs send it)."""


@dataclass(frozen=True, repr=False)
class TokenSet:
    """Tokens and portal facts from a token response (§2.2) or an install payload (§1.4).

    Only what the app reads is kept: a token response's ``client_endpoint``,
    ``server_endpoint`` and ``status`` are not (the portal's address and status come from
    ``app.info``, which the OAuth server vouches for)."""

    access_token: str
    refresh_token: str
    expires_at: datetime
    """Aware UTC datetime when ``access_token`` expires."""
    scope: str
    """Comma-separated granted scopes."""
    member_id: str
    user_id: int | None
    request_method: TokenMethod | None = None
    """How the token request that returned these tokens travelled: ``"post"`` (form body) or
    ``"get"`` (query string); ``None`` for tokens that did not come from the token endpoint
    (install payloads, frame POSTs). See :meth:`OAuthServer.token_method`."""

    @classmethod
    def from_response(cls, data: Mapping[str, Any]) -> TokenSet:
        """Build from a token response; ``expires`` wins over ``expires_in``."""
        access_token = data.get("access_token")
        refresh_token = data.get("refresh_token")
        if not access_token or not refresh_token:
            raise BitrixError("INVALID_TOKEN_RESPONSE", "token response lacks a token")
        try:
            if data.get("expires") not in (None, ""):
                expires_at = datetime.fromtimestamp(int(float(data["expires"])), UTC)
            else:
                lifetime = int(data.get("expires_in") or 3600)  # 1 hour per §2.4
                expires_at = datetime.now(UTC) + timedelta(seconds=lifetime)
            user_id = None if data.get("user_id") in (None, "") else int(data["user_id"])
        except (TypeError, ValueError, OverflowError) as exc:
            raise BitrixError(
                "INVALID_TOKEN_RESPONSE", "token response has a malformed expiry or user_id"
            ) from exc
        return cls(
            access_token=str(access_token),
            refresh_token=str(refresh_token),
            expires_at=expires_at,
            scope=_scope_text(data.get("scope")),
            member_id=str(data.get("member_id") or ""),
            user_id=user_id,
        )

    def __repr__(self) -> str:
        return (
            f"TokenSet(access_token={mask_secret(self.access_token)!r}, "
            f"refresh_token={mask_secret(self.refresh_token)!r}, "
            f"expires_at={self.expires_at.isoformat()!r}, scope={self.scope!r}, "
            f"member_id={self.member_id!r}, user_id={self.user_id!r}, "
            f"request_method={self.request_method!r})"
        )


def _scope_text(value: Any) -> str:
    """Comma list of scopes from a string (commas and/or spaces, §1.4) or a list (oauthlib)."""
    if isinstance(value, list | tuple):
        value = ",".join(str(part) for part in value)
    return ",".join(part for part in re.split(r"[\s,]+", str(value or "")) if part)


def _bare_origin(url: str, *, allow_http: bool, paths: tuple[str, ...]) -> str:
    """Origin of ``url`` when its path is one of ``paths`` and it has no query."""
    origin = parse_origin(url, allow_http=allow_http)
    parts = urlsplit(url)
    if parts.path not in paths or parts.query:
        raise UnsafeURL("NOT_AN_ORIGIN", f"{url!r} is not an OAuth server origin")
    return str(origin)
