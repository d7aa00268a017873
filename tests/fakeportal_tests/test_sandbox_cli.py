"""``python -m tests.fakeportal``: the sandbox CLI."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from .support import CLIENT_ID, CLIENT_SECRET, TIMEOUT

ROOT = Path(__file__).resolve().parents[2]


def _lines(proc) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_sandbox_cli_starts_a_ready_portal_and_installs_the_app(catcher):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakeportal",
            "--app-url",
            catcher.url,
            "--port",
            "0",
            "--oauth-port",
            "0",
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _lines(proc)
        output = []
        task_url = None
        deadline = time.monotonic() + 10
        while task_url is None and time.monotonic() < deadline:
            line = lines.get(timeout=10)
            output.append(line)
            match = re.match(
                r"Sandbox task page: (http://127\.0\.0\.1:\d+/company/personal/user/1/tasks/task/view/1/)$",
                line.strip(),
            )
            if match:
                task_url = match.group(1)
        assert task_url, output
        assert CLIENT_SECRET not in "".join(output)

        # the app is told about the installation once /healthz answers
        deadline = time.monotonic() + 10
        while not catcher.posts("/b24/events/") and time.monotonic() < deadline:
            time.sleep(0.05)
        (event,) = catcher.posts("/b24/events/")
        data = dict(catcher.pairs(event))
        assert data["event"] == "ONAPPINSTALL" and data["auth[user_id]"] == "1"
        assert data["data[INSTALLED]"] == "Y"
        assert any(r["path"] == "/healthz" for r in catcher.requests)

        page = requests.get(task_url, timeout=TIMEOUT)
        assert page.status_code == 200
        assert "Prepare the quarterly report" in page.text and "Boris Petrov" in page.text
        assert f'action="{catcher.url}/b24/app/?DOMAIN=' in page.text
        assert ">Results<" in page.text

        # two results on task 1 (one per user), none on task 2
        token = data["auth[access_token]"]
        portal_url = task_url.split("/company/")[0]
        for task_id, authors in ((1, [1, 2]), (2, [])):
            items = requests.post(
                portal_url + "/rest/api/tasks.task.result.list",
                timeout=TIMEOUT,
                json={"auth": token, "filter": [["taskId", task_id]]},
            ).json()["result"]["items"]
            assert [i["authorId"] for i in items] == authors
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
        finally:
            proc.kill()
    assert code == 0
