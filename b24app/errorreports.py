"""Optional error reports to Sentry, masked as the logs are.

Off unless `SENTRY_DSN` is set: settings then call :func:`start_error_reports` at their end, so
every process that loads them reports, the web processes and the Celery workers alike (the
SDK's Django, Celery, logging and Redis integrations enable themselves). Without it this module
is not even imported, nor is `sentry_sdk`.

Nothing a Bitrix24 secret can hide in leaves unmasked:

- request bodies are never read (`max_request_body_size="never"`), stack frames carry no local
  variables (`include_local_variables=False`), and personal data stays off (`send_default_pii`
  left unset: False, the SDK's default; setting it is deprecated in SDK 2.x), so cookies,
  `Authorization`, the user and client IPs are not collected;
- every event (error or transaction) passes :func:`mask_event` and every breadcrumb
  :func:`mask_breadcrumb` before it leaves: each string in it, the message, the exception
  values, the request URL, query string and headers, breadcrumbs, extra data, contexts and tags
  is masked with :func:`b24app.masking.mask_secrets`, and the value of any field whose name
  names a secret (`AUTH_ID`, `X-Frame-Token`, `refresh_token`, ...) with
  :func:`b24app.masking.mask_field`; a logged record's separate arguments are dropped (its
  formatted message stays). Source lines are masked too, so a line such as
  `f"auth={auth_id}"` reads `auth={aut***}`. If masking fails the SDK drops the event: it is
  never sent unmasked.
"""

from __future__ import annotations

from typing import Any

from b24app.masking import mask_field, mask_secrets

# Top-level identifiers the SDK or the deployment sets; masking would cut a 40-hex release (a
# commit id) like a token.
_KEPT = ("event_id", "release", "dist")
# What the SDK puts in place of a value it left out (a cookie, `Authorization`): nothing to mask.
_SDK_SUBSTITUTE = "[Filtered]"


def _mask(value: Any, name: str | None = None) -> Any:
    """`value` with every string masked; a string under a secret-naming `name` as a whole."""
    if isinstance(value, str):
        if value == _SDK_SUBSTITUTE:
            return value
        return mask_secrets(value) if name is None else mask_field(name, value)
    if isinstance(value, dict):
        return {
            (mask_secrets(key) if isinstance(key, str) else key): _mask(
                item, key if isinstance(key, str) else None
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_mask(item, name) for item in value]
    return value


def mask_event(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """`before_send` and `before_send_transaction`: the whole event, masked."""
    masked = _mask(event)
    for key in _KEPT:
        if key in event:
            masked[key] = event[key]
    logentry = masked.get("logentry")
    if isinstance(logentry, dict):
        # A logged record's arguments, one by one, out of their message: a token alone there
        # (an application token is plain hex, like a member_id) is recognisable by no key. The
        # formatted message, masked, carries them.
        logentry.pop("params", None)
    return masked


def mask_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """`before_breadcrumb`: the breadcrumb masked when it is recorded. Its event masks it again
    when it is sent, once the SDK has turned every value into text, so a keyed value there
    (`auth[access_token]=s6p6***`) ends as `auth[access_token]=***`."""
    return _mask(crumb)


def sentry_options(
    dsn: str, environment: str = "", traces_sample_rate: float = 0.0
) -> dict[str, Any]:
    """The keyword arguments of `sentry_sdk.init`, the tests' and production's alike."""
    return {
        "dsn": dsn,
        "environment": environment or None,  # None: the SDK's default, "production"
        "traces_sample_rate": traces_sample_rate,
        "include_local_variables": False,
        "max_request_body_size": "never",
        "before_send": mask_event,
        "before_send_transaction": mask_event,
        "before_breadcrumb": mask_breadcrumb,
    }


def start_error_reports(dsn: str, environment: str = "", traces_sample_rate: float = 0.0) -> None:
    """Initialise the Sentry SDK in this process."""
    import sentry_sdk

    sentry_sdk.init(**sentry_options(dsn, environment, traces_sample_rate))
