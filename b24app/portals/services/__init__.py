"""Writes about portals and accounts: install, lifecycle events, OAuth reconnect, token refresh.

Every HTTP exchange goes through `b24app.portals.bitrix`. No transaction is held open across an
HTTP call, except the token refresh under its row lock (short, bounded by the client's timeouts
and the database's lock timeout).

The modules, lowest first (each imports only those before it): `exceptions`, `clients` (the
process-wide plumbing), `verification`, `portals`, `accounts` (the token store), `install` (and
bindings), `operator`, `events`, `frames`. This package re-exports their public names.
"""

from b24app.portals.services.accounts import (
    APP_CREDENTIAL_ERRORS,
    CREDENTIALS_EVIDENCE,
    LOCK_NOT_AVAILABLE,
    NO_REFRESH_REASON,
    REENCRYPT_BATCH,
    REFRESH_BUSY_RETRY_S,
    REFRESH_LOCK_MARGIN_S,
    REMOVED_CODES,
    UNPROVEN_REASON,
    WAITING_REASON,
    account_client,
    account_tokens_refresh,
    account_tokens_store,
    accounts_reencrypt,
    refresh_lock_wait_s,
)
from b24app.portals.services.clients import (
    bitrix_config,
    circuit_breaker,
    http_session,
    inflight_limiter,
    oauth_server,
    portal_rate,
    rate_limiter,
    require_configured,
)
from b24app.portals.services.events import (
    EVENT_RECEIPT_DAYS,
    REFRESH_TOKEN_DAYS,
    EventKind,
    EventOutcome,
    Removal,
    event_handle,
    event_receipts_purge,
)
from b24app.portals.services.exceptions import (
    AWAITING_SIGN_IN_RETRY_S,
    BUSY_MESSAGE,
    AccountAwaitingSignIn,
    FrameRefusal,
    FrameRefused,
    NotConfigured,
    PortalError,
    ReencryptStopped,
    VerificationFailed,
)
from b24app.portals.services.frames import (
    FRAME_TOKEN_MARGIN,
    FrameOpened,
    frame_account_open,
    frame_session_renew,
)
from b24app.portals.services.install import (
    BINDINGS_SETTLE_S,
    portal_bindings_check,
    portal_bindings_check_later,
    portal_bindings_due,
    portal_install,
)
from b24app.portals.services.operator import (
    portal_reconnect,
    portal_reconnect_start,
    portal_tokens_refresh,
    portal_verify,
)
from b24app.portals.services.portals import (
    portal_address_confirm,
    portal_block,
    portal_endpoint_update,
    portal_unblock,
    portal_uninstall,
    portal_upsert,
)
from b24app.portals.services.verification import (
    VerifiedAuth,
    application_token_matches,
    auth_verify,
    is_member_id,
)

__all__ = [
    "APP_CREDENTIAL_ERRORS",
    "AWAITING_SIGN_IN_RETRY_S",
    "AccountAwaitingSignIn",
    "BINDINGS_SETTLE_S",
    "BUSY_MESSAGE",
    "CREDENTIALS_EVIDENCE",
    "EVENT_RECEIPT_DAYS",
    "EventKind",
    "EventOutcome",
    "FRAME_TOKEN_MARGIN",
    "FrameRefusal",
    "FrameRefused",
    "LOCK_NOT_AVAILABLE",
    "NO_REFRESH_REASON",
    "NotConfigured",
    "PortalError",
    "REENCRYPT_BATCH",
    "REFRESH_BUSY_RETRY_S",
    "REFRESH_LOCK_MARGIN_S",
    "REFRESH_TOKEN_DAYS",
    "REMOVED_CODES",
    "ReencryptStopped",
    "Removal",
    "UNPROVEN_REASON",
    "VerificationFailed",
    "VerifiedAuth",
    "WAITING_REASON",
    "account_client",
    "account_tokens_refresh",
    "account_tokens_store",
    "accounts_reencrypt",
    "application_token_matches",
    "auth_verify",
    "bitrix_config",
    "circuit_breaker",
    "event_handle",
    "event_receipts_purge",
    "FrameOpened",
    "frame_account_open",
    "frame_session_renew",
    "http_session",
    "inflight_limiter",
    "is_member_id",
    "oauth_server",
    "portal_address_confirm",
    "portal_bindings_check",
    "portal_bindings_check_later",
    "portal_bindings_due",
    "portal_block",
    "portal_endpoint_update",
    "portal_install",
    "portal_rate",
    "portal_reconnect",
    "portal_reconnect_start",
    "portal_tokens_refresh",
    "portal_unblock",
    "portal_uninstall",
    "portal_upsert",
    "portal_verify",
    "rate_limiter",
    "refresh_lock_wait_s",
    "require_configured",
]
