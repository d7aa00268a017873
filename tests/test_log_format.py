"""DJANGO_LOG_FORMAT: `text` (one line, the default) or `json` (one JSON object per line), both
masked by the same filter."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from b24app import settings as settings_module
from b24app.logs import JsonLineFormatter, OneLineFormatter, SecretMaskingFilter
from tests.b24app.test_logs import APP_TOKEN, CLIENT_SECRET, EVENT_ACCESS, FRAME_AUTH_ID, REFRESH
from tests.support.processes import django_process

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# The configured client secret, free-standing in a text (no key names it): masked by its value.
CONFIGURED_SECRET = "Cfg-Client-Secret-Zq81-Lm42-Wx07"
# An application token is plain hex, like a member_id: it is masked by the key that names it.
SECRETS = (EVENT_ACCESS, REFRESH, CLIENT_SECRET, APP_TOKEN, FRAME_AUTH_ID, CONFIGURED_SECRET)


@pytest.fixture(autouse=True)
def _configured_client_secret(settings):
    settings.B24_CLIENT_SECRET = CONFIGURED_SECRET


def _render(formatter: logging.Formatter, *args, masking: bool = True, **kwargs) -> str:
    """What a handler with `formatter` (and the masking filter, unless `masking` is off) writes
    for one `logger.error(*args, **kwargs)`."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    if masking:
        handler.addFilter(SecretMaskingFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger("tests.log_format")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert len(lines) == 1
    return lines[0]


def _failing_refresh() -> None:
    """Raises an exception chained to another, both messages carrying secrets."""
    try:
        raise ValueError(
            f"event access_token={EVENT_ACCESS} for AUTH_ID={FRAME_AUTH_ID}, "
            f"auth[application_token]={APP_TOKEN}"
        )
    except ValueError as error:
        raise RuntimeError(
            f"refresh failed refresh_token={REFRESH} client_secret={CLIENT_SECRET}"
        ) from error


def _log_a_failed_refresh(formatter: logging.Formatter, **kwargs) -> str:
    try:
        _failing_refresh()
    except RuntimeError:
        return _render(
            formatter,
            "refresh failed for %s with %s; APPLICATION_TOKEN=%s; secret %s",
            {"refresh_token": REFRESH},
            f"auth[access_token]={EVENT_ACCESS}",
            APP_TOKEN,
            CONFIGURED_SECRET,
            exc_info=True,
            **kwargs,
        )
    raise AssertionError("the refresh did not fail")


def test_json_line_is_one_parseable_object_with_the_fields():
    line = _render(JsonLineFormatter(), "first line\nsecond line\r\nthird %s", "line")
    assert "\n" not in line and "\r" not in line
    entry = json.loads(line)
    assert STAMP.match(entry["time"])
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "tests.log_format"
    assert entry["message"] == "first line\nsecond line\r\nthird line"
    assert "exception" not in entry  # no traceback, no field


def test_json_time_is_the_text_formats_utc_timestamp():
    record = logging.LogRecord("tests.log_format", logging.INFO, __file__, 1, "hello", (), None)
    record.created = 1795874400.1234  # 2026-11-28T14:00:00.123 UTC
    assert json.loads(JsonLineFormatter().format(record))["time"] == "2026-11-28T14:00:00.123Z"
    assert OneLineFormatter().format(record).startswith("2026-11-28T14:00:00.123Z INFO ")


def test_json_exception_is_the_formatted_traceback_on_the_same_line():
    line = _log_a_failed_refresh(JsonLineFormatter())
    assert "\n" not in line
    exception = json.loads(line)["exception"]
    assert exception.startswith("Traceback (most recent call last):\n")
    assert "in _failing_refresh" in exception
    assert "ValueError: event access_token=" in exception
    assert exception.rstrip().splitlines()[-1].startswith("RuntimeError: refresh failed")


def test_secrets_in_message_args_and_tracebacks_are_masked_in_json_as_in_text():
    text_line = _log_a_failed_refresh(OneLineFormatter())
    json_line = _log_a_failed_refresh(JsonLineFormatter())
    entry = json.loads(json_line)
    for secret in SECRETS:
        assert secret not in text_line
        assert secret not in json_line
        assert secret not in entry["message"] + entry["exception"]
    # Masked forms stay recognisable, in the message (args) and the traceback (both exceptions).
    assert "{'refresh_token': '4s38***'}" in entry["message"]
    assert "auth[access_token]=s6p6***" in entry["message"]
    assert "APPLICATION_TOKEN=5185***" in entry["message"]
    assert "secret ***" in entry["message"]
    assert f"access_token=s6p6*** for AUTH_ID={FRAME_AUTH_ID[:4]}***, " in entry["exception"]
    assert "auth[application_token]=5185***" in entry["exception"]
    assert f"refresh_token=4s38*** client_secret={CLIENT_SECRET[:4]}***" in entry["exception"]
    # The same masking as the text line: the same message and traceback, line breaks aside.
    same = f"ERROR tests.log_format {entry['message']} | {entry['exception']}"
    assert text_line.split(" ", 1)[1] == same.replace("\r", "\\r").replace("\n", "\\n")


def test_a_traceback_another_handler_rendered_unmasked_is_masked_in_json():
    record = None
    try:
        _failing_refresh()
    except RuntimeError:
        record = logging.LogRecord(
            "tests.log_format", logging.ERROR, __file__, 1, "boom", (), sys.exc_info()
        )
    # A handler without the filter, earlier in the chain, caches the traceback unmasked.
    logging.Formatter().format(record)
    assert REFRESH in record.exc_text
    assert SecretMaskingFilter().filter(record)
    line = JsonLineFormatter().format(record)
    for secret in SECRETS:
        assert secret not in line
    assert "RuntimeError: refresh failed refresh_token=4s38***" in json.loads(line)["exception"]


def test_json_formatter_masks_even_without_the_filter():
    line = _log_a_failed_refresh(JsonLineFormatter(), masking=False, stack_info=True)
    entry = json.loads(line)
    for secret in SECRETS:
        assert secret not in line
    assert "auth[access_token]=s6p6***" in entry["message"]
    assert "RuntimeError: refresh failed refresh_token=4s38***" in entry["exception"]
    assert entry["stack"].startswith("Stack (most recent call last):")


class _Request:
    def __repr__(self) -> str:
        return f"<WSGIRequest: POST '/b24/placement/?AUTH_ID={FRAME_AUTH_ID}'>"


def test_json_extra_fields_are_masked_plain_values_only_and_never_replace_the_fields():
    line = _render(
        JsonLineFormatter(),
        "request failed",
        extra={
            "status_code": 500,
            "duration_s": 0.25,
            "retried": False,
            "note": f"auth={APP_TOKEN} refresh_token={REFRESH}",
            "request": _Request(),
            "data": {"args": [EVENT_ACCESS], "kwargs": {"token": CLIENT_SECRET}},
            "level": "forged",
            "logger": "forged",
        },
    )
    entry = json.loads(line)
    for secret in SECRETS:
        assert secret not in line
    assert entry["status_code"] == 500 and entry["duration_s"] == 0.25
    assert entry["retried"] is False
    assert entry["note"] == "auth=5185*** refresh_token=4s38***"
    assert "request" not in entry and "data" not in entry  # not plain values: left out
    assert entry["level"] == "ERROR" and entry["logger"] == "tests.log_format"
    assert not any(key.startswith("b24_") for key in entry)  # the filter's mark stays internal


def test_json_line_breaks_of_any_kind_stay_inside_the_line():
    line = _render(JsonLineFormatter(), "a\nb\x85c\u2028d\u2029e привет")
    assert len(line.splitlines()) == 1
    assert "привет" in line  # other text stays readable
    assert json.loads(line)["message"] == "a\nb\x85c\u2028d\u2029e привет"


def test_log_format_defaults_to_text(monkeypatch):
    monkeypatch.delenv("DJANGO_LOG_FORMAT", raising=False)
    assert settings_module._log_format() == "text"
    monkeypatch.setenv("DJANGO_LOG_FORMAT", "")
    assert settings_module._log_format() == "text"
    assert settings_module.LOG_FORMATTERS["text"] == "b24app.logs.OneLineFormatter"


def test_log_format_json_picks_the_json_formatter(monkeypatch):
    monkeypatch.setenv("DJANGO_LOG_FORMAT", "json")
    assert settings_module._log_format() == "json"
    assert settings_module.LOG_FORMATTERS["json"] == "b24app.logs.JsonLineFormatter"


@pytest.mark.parametrize("value", ["xml", "jsonl", "1", "text,json"])
def test_log_format_refuses_any_other_value_naming_the_variable_and_the_values(monkeypatch, value):
    monkeypatch.setenv("DJANGO_LOG_FORMAT", value)
    with pytest.raises(ImproperlyConfigured) as refused:
        settings_module._log_format()
    message = str(refused.value)
    assert "DJANGO_LOG_FORMAT" in message and "`text` or `json`" in message
    assert repr(value) in message


def test_log_format_refusal_does_not_echo_a_long_value(monkeypatch):
    monkeypatch.setenv("DJANGO_LOG_FORMAT", EVENT_ACCESS)  # a token pasted into the wrong variable
    with pytest.raises(ImproperlyConfigured) as refused:
        settings_module._log_format()
    assert EVENT_ACCESS[:8] not in str(refused.value)
    assert "DJANGO_LOG_FORMAT" in str(refused.value)


def _start_django(log_format: str | None, code: str) -> subprocess.CompletedProcess:
    env = {} if log_format is None else {"DJANGO_LOG_FORMAT": log_format}
    return django_process(code, env=env, leave_out=lambda name: name == "DJANGO_LOG_FORMAT")


LOG_A_TOKEN = (
    "import logging\n"
    f"logging.getLogger('b24app.probe').warning('event auth[access_token]=%s', {EVENT_ACCESS!r})"
)


def test_started_app_logs_json_lines_masked_with_json():
    result = _start_django("json", LOG_A_TOKEN)
    assert result.returncode == 0, result.stderr
    assert EVENT_ACCESS not in result.stdout
    entry = json.loads(result.stdout.strip().splitlines()[-1])
    assert entry["logger"] == "b24app.probe" and entry["level"] == "WARNING"
    assert entry["message"] == "event auth[access_token]=s6p6***"


def test_started_app_logs_text_lines_by_default():
    result = _start_django(None, LOG_A_TOKEN)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert STAMP.match(line.split(" ", 1)[0])
    assert line.endswith(" WARNING b24app.probe event auth[access_token]=s6p6***")


def test_start_up_fails_with_a_bad_log_format():
    result = _start_django("yaml", "")
    assert result.returncode != 0
    assert "ImproperlyConfigured: DJANGO_LOG_FORMAT must be `text` or `json`" in result.stderr
    assert "not 'yaml'" in result.stderr
