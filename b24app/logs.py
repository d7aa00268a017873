"""Logging to stdout, one line per event, with secrets masked.

Code must never log a secret; :class:`SecretMaskingFilter` is the net under that rule: it masks
every record with :func:`b24app.masking.mask_secrets` (what it masks is described there).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from b24app.masking import mask_secrets

CLAIMED_ID_CHARS = 8


def claimed_id(value: object) -> str:
    """An id a request claims (a `member_id` of a refused request), shortened for a log line.

    A refused request may carry anything in that field, a secret included, and a 32-character
    hex token looks exactly like a member_id, so masking cannot tell. Eight characters still let
    an operator find the portal.
    """
    text = str(value)
    return text if len(text) <= CLAIMED_ID_CHARS else text[:CLAIMED_ID_CHARS] + "…"


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
