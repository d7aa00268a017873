"""The one place that decides what of a secret may be shown: in logs, errors and the admin.

A masked value keeps its first four characters (as the Bitrix24 security guide suggests, §9.1)
so an operator can still tell two tokens apart; a value shorter than eight characters keeps none.

- :func:`mask_secret`: one known secret (a token column, a repr).
- :func:`redact`: server-provided text (an error description) with the given secrets and
  anything token-like masked.
- :func:`mask_secrets`: any text (a log line). Bitrix24 hands the app bearer secrets in many
  shapes: `AUTH_ID`/`REFRESH_ID` form fields, `auth[...]` event keys, `auth` in JSON bodies,
  `access_token=` in query strings, OAuth token responses. It masks the value of any key that
  names a secret (in `key=value`, `"key": "value"`, `key: value` forms; `code` included: the
  OAuth authorization code arrives in the callback's query string), free-standing strings shaped
  like Bitrix24 tokens (long hex runs such as `AUTH_ID`, 32-char lowercase alphanumerics that
  are not plain hex such as event `access_token`s), and the configured `DJANGO_SECRET_KEY`,
  `B24_FRAME_SIGNING_KEY`, `B24_HEALTH_TOKEN`, `B24_METRICS_TOKEN`, `B24_CLIENT_SECRET` and
  `B24_TOKEN_KEYS` values wherever they appear.
- :func:`mask_field`: the value of a named field in structured data (a header, a dict item of an
  error report): all of it when the name names a secret, else as :func:`mask_secrets` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MASK", "mask_field", "mask_secret", "mask_secrets", "redact"]

MASK = "***"


def mask_secret(value: str | None) -> str:
    """Loggable form of a token or secret: the first 4 characters and ``***``."""
    if not value:
        return ""
    return f"{value[:4]}{MASK}" if len(value) >= 8 else MASK


# Token-like runs: 24+ letters and digits with at least one of each (Bitrix24 tokens are 32-70
# such characters). Localised words and error codes (with "_") do not match.
_TOKEN_LIKE = re.compile(r"\b(?=[A-Za-z]*[0-9])(?=[0-9]*[A-Za-z])[A-Za-z0-9]{24,}\b")


def redact(text: str, secrets: Iterable[str]) -> str:
    """Mask the given secrets and anything that looks like a token in server-provided text."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, mask_secret(secret))
    return _TOKEN_LIKE.sub(lambda match: mask_secret(match.group()), text)


# Names of fields that hold secrets (not secrets themselves).
_SECRET_FIELD_NAMES = (
    r"access_token|refresh_token|application_token|client_secret|auth_id|refresh_id|"
    r"auth|code|password|secret|token|authorization"
)
# key=value (query strings, form bodies, reprs) and "key": "value" / 'key': 'value' (JSON, dicts);
# bracket keys like auth[access_token] are matched through their inner name.
_KEYED = re.compile(
    r"""(?P<key>(?<![A-Za-z0-9_])(?:"""
    + _SECRET_FIELD_NAMES
    + r""")\]?)(?P<sep>["']?\s*[:=]\s*["']?)(?P<value>[^\s"'&,;)}\]]{4,})""",
    re.IGNORECASE,
)
# AUTH_ID / REFRESH_ID style: 40+ hex characters.
_LONG_HEX = re.compile(r"(?<![0-9A-Za-z])[0-9a-f]{40,}(?![0-9A-Za-z])", re.IGNORECASE)
# Event-style tokens: 32 lowercase alphanumerics with at least one non-hex letter (member_id and
# other plain-hex ids stay readable).
_EVENT_TOKEN = re.compile(r"(?<![0-9A-Za-z])(?=[0-9a-z]{32}(?![0-9A-Za-z]))[0-9a-z]*[g-z][0-9a-z]*")


def _configured_secrets() -> list[str]:
    try:
        from django.conf import settings

        candidates = [
            settings.SECRET_KEY,
            settings.B24_FRAME_SIGNING_KEY,
            settings.B24_HEALTH_TOKEN,
            settings.B24_METRICS_TOKEN,
            settings.B24_CLIENT_SECRET,
            *settings.B24_TOKEN_KEYS,
        ]
    except Exception:  # settings not configured (e.g. a bare script); keyed masking still applies
        return []
    return [secret for secret in candidates if secret and len(secret) >= 8]


def mask_secrets(text: str) -> str:
    """Return `text` with every secret-looking value masked."""
    for secret in _configured_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    text = _KEYED.sub(
        lambda m: m.group("key") + m.group("sep") + mask_secret(m.group("value")), text
    )
    text = _LONG_HEX.sub(lambda m: mask_secret(m.group(0)), text)
    return _EVENT_TOKEN.sub(lambda m: mask_secret(m.group(0)), text)


# A field name that names a secret: one of the names above as a whole (`AUTH_ID`,
# `auth[access_token]`, `code`; not `status_code`), or any name ending in token, secret,
# password, authorization or cookie (`X-Frame-Token`, `frame_token`, `HTTP_AUTHORIZATION`).
_SECRET_NAME = re.compile(
    r"(?:^|[^A-Za-z0-9_])(?:"
    + _SECRET_FIELD_NAMES
    + r")\]?$|(?:token|secret|password|authorization|cookie)\]?$",
    re.IGNORECASE,
)


def mask_field(name: str, value: str) -> str:
    """The value of the field `name` (a header, a dict item), masked as a whole, four characters
    kept, when the name names a secret; any other value as :func:`mask_secrets` masks text."""
    if _SECRET_NAME.search(name.strip()):
        return mask_secret(value)
    return mask_secrets(value)
