"""Whole-run log check: no token a fake Bitrix24 issued may appear in any log line of the run.

Loaded for every test run (`-p tests.security.logcheck` in pyproject's `addopts`). It records
every line the run logs, rendered the way production renders it: through the filters and the
formatter of the app's configured stdout handler (`b24app.logs.SecretMaskingFilter` and
`OneLineFormatter`, from `settings.LOGGING`), so a line counts as leaked only if the masking net
let the token through. It also reads the log files that a test's subprocesses write into its
`tmp_path` (the Celery workers of `tests/celery_worker.py` log there, through the same
`LOGGING`). At the end of the session every secret any `FakeBitrix` of this process issued
(`tests.fakeportal.issued_secrets`: access and refresh tokens, application tokens, codes) is
looked for in those lines; one found fails the run with the test that logged it and the token's
first four characters, never the token.

Records of the emulator's own loggers (`fakeportal.*`) are left out: production has no fake.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

# The security suite proves this plugin with pytest's `pytester` fixture, and `pytest_plugins`
# may only be declared at the top level of a run: a plugin loaded with `-p` is such a place.
pytest_plugins = ["pytester"]

OUTSIDE_TESTS = "(outside any test: session set-up or teardown)"
_EMULATOR_LOGGERS = "fakeportal"
_HEX_RUN = re.compile(r"[0-9a-fA-F]+")
_HEX_TOKEN = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Leak:
    where: str
    """The test (node id) that logged the line, and the log file it was found in, if any."""
    token_prefix: str
    line: str
    """The line with every leaked token cut down to its masked prefix."""


def masked(token: str) -> str:
    return token[:4] + "***"


class _RunLog(logging.Handler):
    """Collects every record as a production line, tagged with the test that is running."""

    def __init__(self, check: LogCheck) -> None:
        super().__init__()
        self._check = check
        self._use_app_rendering()

    def _use_app_rendering(self) -> None:
        """Take the filters and formatter of the handler `settings.LOGGING` puts on the root
        logger; without Django (the emulator's own tests) build the same two from b24app.logs."""
        from b24app.logs import OneLineFormatter, SecretMaskingFilter

        for handler in logging.getLogger().handlers:
            if any(isinstance(f, SecretMaskingFilter) for f in handler.filters):
                self.filters = list(handler.filters)
                self.setFormatter(handler.formatter)
                return
        self.filters = [SecretMaskingFilter()]
        self.setFormatter(OneLineFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        if name == _EMULATOR_LOGGERS or name.startswith(_EMULATOR_LOGGERS + "."):
            return
        try:
            line = self.format(record)
        except Exception:  # a broken record must not break the run; logging would print it
            self.handleError(record)
            return
        self._check.lines.append((self._check.current, line))


class LogCheck:
    def __init__(self) -> None:
        self.current = OUTSIDE_TESTS
        self.lines: list[tuple[str, str]] = []
        self.leaks: list[Leak] = []
        self._handler: _RunLog | None = None

    # --- collecting --------------------------------------------------------------------------

    def _attach(self) -> None:
        """Put the collector on the root logger and on every logger that does not propagate
        (Django's `django` logger among them); again before each test, in case a test
        reconfigured logging."""
        if self._handler is None:
            self._handler = _RunLog(self)
        loggers = [logging.getLogger()] + [
            logger
            for logger in list(logging.Logger.manager.loggerDict.values())
            if isinstance(logger, logging.Logger) and not logger.propagate
        ]
        for logger in loggers:
            if self._handler not in logger.handlers:
                logger.addHandler(self._handler)

    def _detach(self) -> None:
        if self._handler is None:
            return
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger) and self._handler in logger.handlers:
                logger.removeHandler(self._handler)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._attach()

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self._attach()
        self.current = nodeid

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem):
        tmp_path = (getattr(item, "funcargs", None) or {}).get("tmp_path")
        try:
            return (yield)
        finally:
            # After teardown the test's workers are stopped and their logs complete.
            if isinstance(tmp_path, Path):
                self._read_log_files(item.nodeid, tmp_path)

    def pytest_runtest_logfinish(self, nodeid: str, location) -> None:
        self.current = OUTSIDE_TESTS

    def _read_log_files(self, nodeid: str, folder: Path) -> None:
        for path in sorted(folder.glob("**/*.log")):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            where = f"{nodeid} (its log file {path.name})"
            self.lines.extend((where, line) for line in text.splitlines())

    # --- judging -----------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        self._detach()
        from tests.fakeportal import issued_secrets

        self.leaks = find_leaks(self.lines, issued_secrets())
        self.lines = []
        if self.leaks and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.leaks:
            return
        terminalreporter.write_sep("=", "issued Bitrix24 tokens found in log lines", red=True)
        terminalreporter.write_line(
            f"{len(self.leaks)} log line(s) carry a token a fake Bitrix24 issued in this run. "
            "Logs must never contain a token: mask it or do not log it (b24app/masking.py)."
        )
        for leak in self.leaks[:50]:
            terminalreporter.write_line(f"{leak.where}: token {leak.token_prefix} in: {leak.line}")
        if len(self.leaks) > 50:
            terminalreporter.write_line(f"... and {len(self.leaks) - 50} more")


def find_leaks(lines: list[tuple[str, str]], tokens: frozenset[str]) -> list[Leak]:
    """Every (where, line) that contains one of `tokens` (case-insensitively for hex tokens).

    Bitrix24's tokens, and all the fake issues, are hex: each run of hex characters in a line
    is cut out and every window of a token's length looked up in a set, which stays fast over a
    whole run's lines. A token of any other shape is searched for as a plain substring."""
    hex_tokens = {token for token in tokens if _HEX_TOKEN.match(token)}
    other_tokens = [token for token in tokens if token not in hex_tokens]
    lengths = sorted({len(token) for token in hex_tokens})
    shortest = lengths[0] if lengths else 0
    leaks: list[Leak] = []
    for where, line in lines:
        found: set[str] = set()
        if hex_tokens:
            for run in _HEX_RUN.findall(line):
                if len(run) < shortest:
                    continue
                run = run.lower()
                for length in lengths:
                    for start in range(len(run) - length + 1):
                        if run[start : start + length] in hex_tokens:
                            found.add(run[start : start + length])
        found.update(token for token in other_tokens if token in line)
        if found:
            shown = line
            for token in found:
                shown = re.sub(re.escape(token), masked(token), shown, flags=re.IGNORECASE)
            leaks.extend(Leak(where, masked(token), shown[:300]) for token in sorted(found))
    return leaks


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(LogCheck(), "security-logcheck")
