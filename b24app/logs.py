"""Logging to stdout, one line per event, with secrets masked.

Code must never log a secret; :class:`SecretMaskingFilter` is the net under that rule: it masks
every record with :func:`b24app.masking.mask_secrets` (what it masks is described there).
Lines are text (:class:`OneLineFormatter`) or JSON objects (:class:`JsonLineFormatter`), as
`DJANGO_LOG_FORMAT` says.
"""

from __future__ import annotations

import json
import logging
import math
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


# Set on a record by SecretMaskingFilter: its message, exception and stack texts are masked.
MASKED_ATTR = "b24_secrets_masked"


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
        setattr(record, MASKED_ATTR, True)
        return True


def _utc_stamp(record: logging.LogRecord) -> str:
    """`2026-11-28T14:00:00.123Z`: the record's time in UTC, to the millisecond."""
    stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return stamp[:-3] + "Z"


class OneLineFormatter(logging.Formatter):
    """`2026-11-28T14:00:00.123Z INFO logger message | traceback` on a single line."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc_stamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += " | " + record.exc_text
        if record.stack_info:
            line += " | " + record.stack_info
        return line.replace("\r", "\\r").replace("\n", "\\n")


# Attributes every LogRecord has; any other attribute came with `extra=` (or from a library).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    MASKED_ATTR,
}
# Unicode line breaks that json.dumps(ensure_ascii=False) leaves as they are but that some line
# readers (str.splitlines among them) split on.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line, for a log aggregator: `time`, `level`, `logger`, `message`, and
    `exception` (the traceback) and `stack` when the record has them.

    Extra attributes of the record (`extra=`, such as Django's `status_code`) are kept when they
    are plain values (text, numbers, booleans, null), text masked; others (a request, a dict of
    task arguments) are left out: their text could carry anything. They never replace the fields
    above. The masking filter renders the message and the traceback masked before this runs; a
    record that did not pass through it (the formatter used alone) is masked here.
    """

    def format(self, record: logging.LogRecord) -> str:
        message, exception, stack = record.getMessage(), record.exc_text, record.stack_info
        if record.exc_info and not exception:
            exception = self.formatException(record.exc_info)
        if not getattr(record, MASKED_ATTR, False):  # not through the filter: mask here
            message = mask_secrets(message)
            exception = mask_secrets(exception) if exception else exception
            stack = mask_secrets(stack) if stack else stack
        entry: dict[str, object] = {
            "time": _utc_stamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        if exception:
            entry["exception"] = exception
        if stack:
            entry["stack"] = stack
        for name, value in record.__dict__.items():
            if name in _RECORD_ATTRS or name in entry or name.startswith("_"):
                continue
            if isinstance(value, str):
                entry[name] = mask_secrets(value)
            elif value is None or isinstance(value, bool | int):
                entry[name] = value
            elif isinstance(value, float):
                entry[name] = value if math.isfinite(value) else str(value)
        line = json.dumps(entry, ensure_ascii=False)
        for char, escaped in _LINE_BREAKS.items():
            line = line.replace(char, escaped)
        return line
