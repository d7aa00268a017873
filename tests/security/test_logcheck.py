"""The whole-run log check (`tests/security/logcheck.py`) fails a run that logs an issued token,
and only such a run. Each case is a real `pytest` run in a subprocess, with the plugin loaded
as pyproject loads it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

TEST_FILE = '''
import logging

from tests.fakeportal import FakeBitrix

log = logging.getLogger("b24app.portals")


def _portal():
    fake = FakeBitrix().start()
    portal = fake.add_portal()
    portal.add_user(name="Anna", last_name="Smirnova", admin=True)
    return fake, portal


def _issued(*tokens):
    """Tell the outer test which tokens this run issued (it checks none is printed)."""
    with open("issued.txt", "a") as out:
        out.write("\\n".join(tokens) + "\\n")


def test_logs_masked_tokens_only():
    fake, portal = _portal()
    try:
        tokens = portal.issue_tokens(1)
        _issued(tokens["access_token"], tokens["refresh_token"])
        # Keyed and free-standing long tokens are masked by the app's filter.
        log.warning("refresh failed refresh_token=%s", tokens["refresh_token"])
        log.warning("frame AUTH_ID %s", tokens["access_token"])
        log.info("portal %s installed", portal.member_id)
    finally:
        fake.stop()


def test_logs_an_application_token():
    fake, portal = _portal()
    try:
        _issued(portal.application_token)
        # 32 hex characters next to no key name: the filter cannot tell it from a member_id.
        log.warning("portal %s sent %s", portal.member_id, portal.application_token)
    finally:
        fake.stop()


def test_worker_log(tmp_path):
    fake, portal = _portal()
    try:
        tokens = portal.issue_tokens(1)
        _issued(tokens["access_token"])
        (tmp_path / "celery-worker.log").write_text("INFO task got x" + tokens["access_token"])
    finally:
        fake.stop()
'''


@pytest.fixture
def run_with_plugin(pytester, monkeypatch):
    """Run the test file above (or a selection of it) in a fresh `pytest` process; returns the
    result and the tokens the run issued (its tests write them to `issued.txt`)."""
    pytester.makepyfile(test_leaks=TEST_FILE)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )

    def run(*selection: str):
        result = pytester.runpytest_subprocess(
            "-p", "tests.envdefaults", "-p", "tests.security.logcheck", "-p", "no:cacheprovider",
            *selection,
        )  # fmt: skip
        issued = pytester.path / "issued.txt"
        tokens = issued.read_text().split() if issued.exists() else []
        assert tokens, result.stdout.str()
        return result, result.stdout.str() + result.stderr.str(), tokens

    return run


def test_logcheck_passes_a_run_whose_logs_carry_only_masked_tokens(run_with_plugin):
    result, output, tokens = run_with_plugin("test_leaks.py::test_logs_masked_tokens_only")

    assert result.ret == pytest.ExitCode.OK, output
    assert "issued Bitrix24 tokens found in log lines" not in output
    assert not [token for token in tokens if token in output]


def test_logcheck_fails_a_run_that_logs_an_issued_token_and_names_where(run_with_plugin):
    result, output, tokens = run_with_plugin("test_leaks.py")

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "3 passed" in output  # every test passed: the log check alone failed the run
    result.stdout.fnmatch_lines(
        [
            "*issued Bitrix24 tokens found in log lines*",
            "test_leaks.py::test_logs_an_application_token: token ????*** in: *sent ????***",
            "test_leaks.py::test_worker_log (its log file celery-worker.log): "
            "token ????*** in: *x????***",
        ]
    )
    assert "test_logs_masked_tokens_only: token" not in output
    assert not [token for token in tokens if token in output], "the report printed a token"
