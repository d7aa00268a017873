"""The only package that speaks HTTP to Bitrix24: REST client, OAuth server, typed errors.

Nothing here touches the database. Tokens, the "token expired" refresh and the "portal moved"
update are passed in by the services layer, which owns storage and locking::

    config = BitrixConfig(client_id=..., client_secret=..., oauth_servers=(...,))
    session = build_session(config)                      # one per process
    client = BitrixClient(
        account.client_endpoint, account.access_token, config=config, session=session,
        on_expired=lambda: account_tokens_refresh(account_id=...),   # returns the new token
        on_domain_change=lambda endpoint: portal_endpoint_update(...),
        limiter=limiter, limiter_key=portal.member_id, rate=portal.rate_limit,
    )
    item = client.call_v3("tasks.task.result.add", {"fields": {"taskId": 51, "text": "Done"}},
                          idempotency_key=change.key)["item"]

Errors are all :class:`BitrixError` subclasses chosen by error code and HTTP status (never by
message text, which is localised). Tokens and the client secret never appear in log records,
error messages or reprs, nor in URLs, save one case: a token request to an OAuth server that
reads no POST body goes by GET with a query string (see :class:`OAuthServer`); it is masked in
every log record. Protocol references (§) point to ``docs/PROTOCOL.md``.

Modules, lowest first: ``constants``, ``errors`` (the typed errors and how an answer maps to
one), ``netguard`` (which URLs and peers may get a token), ``config`` (:class:`BitrixConfig`,
:class:`TokenSet`), ``transport`` (deadline, size cap, sessions), ``oauth``
(:class:`OAuthServer`), ``client`` (:class:`BitrixClient`) and ``methods`` (the methods the
app calls and the shapes of their answers). Import from this package unless a name is not
exported.
"""

from b24app.portals.bitrix.client import WRITE_SUFFIXES, BitrixClient, V3Listing
from b24app.portals.bitrix.config import BitrixConfig, TokenMethod, TokenSet
from b24app.portals.bitrix.constants import DEFAULT_OAUTH_SERVERS
from b24app.portals.bitrix.errors import (
    ACCESS_DENIED_CODES,
    AUTH_ERROR_CODES,
    IDEMPOTENCY_KEY_REUSED,
    TOKEN_EXPIRED_CODES,
    UNAVAILABLE_CODES,
    VALIDATION_CODES,
    BitrixAccessDenied,
    BitrixAuthError,
    BitrixError,
    BitrixInvalidResponse,
    BitrixTokenExpired,
    BitrixUnavailable,
    BitrixValidationError,
    UnsafeURL,
)
from b24app.portals.bitrix.netguard import check_base_url, client_endpoint_for
from b24app.portals.bitrix.oauth import OAuthServer, oauth_origin_for
from b24app.portals.bitrix.transport import build_session

__all__ = [
    "ACCESS_DENIED_CODES",
    "AUTH_ERROR_CODES",
    "DEFAULT_OAUTH_SERVERS",
    "IDEMPOTENCY_KEY_REUSED",
    "TOKEN_EXPIRED_CODES",
    "UNAVAILABLE_CODES",
    "VALIDATION_CODES",
    "WRITE_SUFFIXES",
    "BitrixAccessDenied",
    "BitrixAuthError",
    "BitrixClient",
    "BitrixConfig",
    "BitrixError",
    "BitrixInvalidResponse",
    "BitrixTokenExpired",
    "BitrixUnavailable",
    "BitrixValidationError",
    "OAuthServer",
    "TokenMethod",
    "TokenSet",
    "UnsafeURL",
    "V3Listing",
    "build_session",
    "check_base_url",
    "client_endpoint_for",
    "oauth_origin_for",
]
