"""Logging to stdout, one line per event, with secrets masked.

Bitrix24 hands the app bearer secrets in many shapes: `AUTH_ID`/`REFRESH_ID` form fields,
`auth[...]` event keys, `auth` in JSON bodies, `access_token=` in query strings, OAuth token
responses. Code must never log them; this filter is the net under that rule. It masks

- the value of any key that names a secret (in `key=value`, `"key": "value"`, `key: value` forms;
  `code` included: the OAuth authorization code arrives in the callback's query string),
- free-standing strings shaped like Bitrix24 tokens (long hex runs such as `AUTH_ID`, 32-char
  lowercase alphanumerics that are not plain hex such as event `access_token`s),
- the configured `DJANGO_SECRET_KEY`, `B24_FRAME_SIGNING_KEY`, `B24_HEALTH_TOKEN` and
  `B24_CLIENT_SECRET` values wherever they appear.

A masked value keeps its first four characters (as the Bitrix24 security guide suggests) so an
operator can still tell two tokens apart.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

MASK = "***"

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


CLAIMED_ID_CHARS = 8


def claimed_id(value: object) -> str:
    """An id a request claims (a `member_id` of a refused request), shortened for a log line.

    A refused request may carry anything in that field, a secret included, and a 32-character
    hex token looks exactly like a member_id, so masking cannot tell. Eight characters still let
    an operator find the portal.
    """
    text = str(value)
    return text if len(text) <= CLAIMED_ID_CHARS else text[:CLAIMED_ID_CHARS] + "…"


def _mask_value(value: str) -> str:
    return value[:4] + MASK


def _configured_secrets() -> list[str]:
    try:
        from django.conf import settings

        candidates = [
            settings.SECRET_KEY,
            settings.B24_FRAME_SIGNING_KEY,
            settings.B24_HEALTH_TOKEN,
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
        lambda m: m.group("key") + m.group("sep") + _mask_value(m.group("value")), text
    )
    text = _LONG_HEX.sub(lambda m: _mask_value(m.group(0)), text)
    return _EVENT_TOKEN.sub(lambda m: _mask_value(m.group(0)), text)


class SecretMaskingFilter(logging.Filter):
    """Render the record's message (and exception text) once, masked, so no handler sees secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_secrets(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info)
        return True


class OneLineFormatter(logging.Formatter):
    """`2026-11-28T14:00:00.123Z INFO logger message | traceback` on a single line."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        line = f"{stamp}Z {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += " | " + record.exc_text
        if record.stack_info:
            line += " | " + record.stack_info
        return line.replace("\r", "\\r").replace("\n", "\\n")
