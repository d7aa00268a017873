"""``python -m tests.fakeportal --member-id … --state …``: a restarted sandbox is the same portal
to the app (the same member_id and application_token, and the tokens it issued still work)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from tests.fakeportal import FakeBitrix
from tests.fakeportal.__main__ import build_sandbox, sandbox_state

from .support import CLIENT_ID, CLIENT_SECRET, TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
MEMBER_ID = "5a4db0c5000000000000000000000001"


class Sandbox:
    """One `python -m tests.fakeportal` process, started and waited for until its
    ONAPPINSTALL reached the catcher."""

    def __init__(self, catcher, *options: str):
        self.catcher = catcher
        seen = len(catcher.posts("/b24/events/"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakeportal", "--app-url", catcher.url]
            + ["--port", "0", "--oauth-port", "0", "--client-id", CLIENT_ID]
            + ["--client-secret", CLIENT_SECRET, *options],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True
        ).start()
        self.output = []
        deadline = time.monotonic() + 10
        while not any(line.startswith("Sandbox app page:") for line in self.output):
            assert time.monotonic() < deadline, self.output
            self.output.append(lines.get(timeout=10))
        text = "".join(self.output)
        self.oauth_url = re.search(r"^OAuth server: (\S+)", text, re.M).group(1)
        self.portal_url, self.member_id = re.search(
            r"^Portal: (\S+) \(member_id ([0-9a-f]+),", text, re.M
        ).groups()
        while len(catcher.posts("/b24/events/")) == seen:
            assert time.monotonic() < deadline, "no ONAPPINSTALL"
            time.sleep(0.05)
        self.event = dict(catcher.pairs(catcher.posts("/b24/events/")[-1]))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        finally:
            self.proc.kill()


def _app_info(oauth_url: str, access_token: str) -> requests.Response:
    return requests.post(oauth_url + "/rest/app.info", data={"auth": access_token}, timeout=TIMEOUT)


def test_a_restart_with_the_same_state_is_the_same_portal(catcher, tmp_path):
    state = tmp_path / "sandbox.json"
    first = Sandbox(catcher, "--state", str(state))
    try:
        assert first.event["event"] == "ONAPPINSTALL"
        assert first.event["auth[member_id]"] == first.member_id
        access, refresh = first.event["auth[access_token]"], first.event["auth[refresh_token]"]
        # Written while it runs, not only at a clean stop: a killed sandbox keeps them too.
        deadline = time.monotonic() + 5
        while refresh not in (state.read_text() if state.exists() else ""):
            assert time.monotonic() < deadline, "the tokens were not written"
            time.sleep(0.05)
    finally:
        assert first.stop() == 0
    kept = json.loads(state.read_text())
    assert kept["member_id"] == first.member_id
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert CLIENT_SECRET not in state.read_text()

    second = Sandbox(catcher, "--state", str(state))
    try:
        assert second.member_id == first.member_id
        assert second.event["auth[member_id]"] == first.member_id
        assert second.event["auth[application_token]"] == first.event["auth[application_token]"]
        # What the app stored from the first start still works at the second.
        info = _app_info(second.oauth_url, access)
        assert info.status_code == 200, info.text
        assert info.json()["result"]["install"]["member_id"] == first.member_id
        renewed = requests.post(
            second.oauth_url + "/oauth/token/",
            data={
                "grant_type": "refresh_token",
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "refresh_token": refresh,
            },
            timeout=TIMEOUT,
        )
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["member_id"] == first.member_id
    finally:
        assert second.stop() == 0
    # The second start kept the token it issued on the renewal, and no longer the spent one.
    kept = json.loads(state.read_text())
    assert renewed.json()["refresh_token"] in {t["token"] for t in kept["refresh_tokens"]}
    assert {t["token"]: t["used"] for t in kept["refresh_tokens"]}[refresh] is True


def test_member_id_names_the_portal_at_every_start(catcher):
    starts = []
    for _ in range(2):
        sandbox = Sandbox(catcher, "--member-id", MEMBER_ID)
        try:
            starts.append((sandbox.member_id, sandbox.event["auth[member_id]"]))
        finally:
            assert sandbox.stop() == 0
    assert starts == [(MEMBER_ID, MEMBER_ID)] * 2


def test_without_member_id_or_state_each_start_is_another_portal(catcher):
    first, second = (build_sandbox(FakeBitrix().start(), 0, "F") for _ in range(2))
    try:
        assert first.member_id != second.member_id
        assert first.application_token != second.application_token
    finally:
        first.fake.stop()
        second.fake.stop()


def test_a_state_of_another_portal_is_not_used():
    with FakeBitrix() as before:
        other = build_sandbox(before, 0, "F", member_id="ab" * 16)
        other.issue_tokens(1)
        kept = sandbox_state(before, other)
    assert len(kept["access_tokens"]) == len(kept["refresh_tokens"]) == 1
    with FakeBitrix() as after:
        portal = build_sandbox(after, 0, "F", member_id=MEMBER_ID, state=kept)
        assert portal.member_id == MEMBER_ID
        assert portal.application_token != kept["application_token"]
        assert not after.access_tokens and not after.refresh_tokens
