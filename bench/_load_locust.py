"""The simulated people of ``bench/load.py``: locust users that open the screen and edit.

Only ``bench/load.py`` runs this, as ``locust -f bench/_load_locust.py`` in a process of its own:
importing locust monkeypatches the standard library with gevent, which must not happen in the
bench's process (the leading underscore keeps ``python -m bench`` from importing it). The bench
hands over a plan in the JSON file that ``BENCH_LOAD_PLAN`` names: the think time, the edits per
open, where to write the samples, and one entry per simulated person (a Bitrix24 user of the fake
portal with its own tokens, the task it opens, its own result there, and the frame POST
Bitrix24 would send to open the app).

Each locust user takes the next person and repeats: open the placement (``POST /b24/app/``, the
frame POST), then edit its own result ``edits_per_open`` times (``POST
/b24/app/results/<id>/edit/`` with the screen's frame token, as the page's ``fetch`` does), with
the think time after every request (the first cycle has a random number of edits, from none
to ``edits_per_open``, so that users who all started at once fall out of step). Every request
carries ``X-Bench-Request: <user>-<n>``, which the bench's gunicorn writes into its access log,
and every answer is checked: a wrong answer counts as a failure like a non-2xx one. One JSON
line per request goes to the samples file, and one line each when every user has started and
when the run stops.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from urllib.parse import urlencode

from locust import FastHttpUser, between, constant, events, task
from locust.exception import StopUser

PLAN = json.loads(Path(os.environ["BENCH_LOAD_PLAN"]).read_text(encoding="utf-8"))
FRAME_TOKEN = re.compile(r'data-frame-token="([^"]+)"')
RESULT_ITEM = '<li class="result'
FORM = "application/x-www-form-urlencoded"

_people = iter(PLAN["people"])
_samples = open(PLAN["samples"], "a", encoding="utf-8", buffering=1)  # open while locust runs


def _write(line: dict) -> None:
    _samples.write(json.dumps(line) + "\n")


@events.request.add_listener
def _sample(name, response_time, response, context, exception, start_time=None, **_):
    _write(
        {
            "kind": name,
            "user": context.get("user"),
            "request": context.get("request"),
            "text": context.get("text"),
            "start": start_time,
            "ms": response_time,
            "status": getattr(response, "status_code", 0) or 0,
            "failure": None if exception is None else str(exception)[:300],
        }
    )


@events.spawning_complete.add_listener
def _spawned(**_):
    _write({"event": "spawned", "time": time.time()})


@events.test_stopping.add_listener
def _stopping(**_):
    _write({"event": "stopping", "time": time.time()})


class Person(FastHttpUser):
    """One person with the task's screen open in their Bitrix24, editing their own result."""

    wait_time = (
        between(PLAN["think_s"] / 2, PLAN["think_s"] * 3 / 2) if PLAN["think_s"] else constant(0)
    )

    def on_start(self) -> None:
        person = next(_people, None)
        if person is None:
            raise StopUser()  # more locust users than people in the plan
        self.person = person
        self.text = person["text"]
        self.frame_token = ""
        self.edits_left = 0
        self.sent = 0
        # All users start within a second; a random number of edits after the first open puts
        # them out of step, so that the opens do not keep arriving together.
        self.first_edits = random.randint(0, PLAN["edits_per_open"])

    def context(self) -> dict:
        return {"user": self.person["user"]}

    @task
    def step(self) -> None:
        if not self.frame_token or self.edits_left <= 0:
            self.open_screen()
        else:
            self.edit_result()

    def _request_id(self) -> str:
        self.sent += 1
        return f"{self.person['user']}-{self.sent}"

    def open_screen(self) -> None:
        request_id = self._request_id()
        self.frame_token = ""
        with self.client.post(
            self.person["open_path"],
            data=self.person["open_body"],
            headers={"Content-Type": FORM, "X-Bench-Request": request_id},
            name="open",
            context={"request": request_id},
            catch_response=True,
        ) as response:
            html = (response.text or "") if response.status_code == 200 else ""
            match = FRAME_TOKEN.search(html)
            if response.status_code != 200:
                response.failure(_status(response))
            elif html.count(RESULT_ITEM) != PLAN["results_per_task"] or match is None:
                response.failure(f"{html.count(RESULT_ITEM)} results, token {match is not None}")
            else:
                response.success()
                self.frame_token = match.group(1)
                self.edits_left, self.first_edits = self.first_edits, PLAN["edits_per_open"]

    def edit_result(self) -> None:
        request_id = self._request_id()
        self.edits_left -= 1
        text = f"Edit {self.sent} by user {self.person['user']}: figures checked again"
        fields = {"task": self.person["task"], "text": text, "text_before": self.text}
        with self.client.post(
            f"/b24/app/results/{self.person['result']}/edit/",
            data=urlencode(fields),
            headers={
                "Content-Type": FORM,
                "Accept": "application/json",
                "X-Frame-Token": self.frame_token,
                "X-Bench-Request": request_id,
            },
            name="edit",
            context={"request": request_id, "text": text},
            catch_response=True,
        ) as response:
            problem = _edit_problem(response, text)
            if problem:
                response.failure(problem)
            else:
                response.success()
                self.text = text


def _edit_problem(response, text: str) -> str | None:
    """Why an edit's answer is wrong (not saved at once, or the new text not shown), or None."""
    if response.status_code != 200:
        return _status(response)
    try:
        payload = response.json()
    except ValueError:
        return "not JSON"
    # The answer carries only what changed: the change's state and, for an edit, its text.
    if not isinstance(payload, dict):
        return "not a JSON object"
    change = payload.get("change")
    if payload.get("error") or not isinstance(change, dict):
        return f"error {payload.get('error')!r:.100}"
    if change.get("state") != "saved":
        return f"not saved at once: {change.get('state')!r:.30}"
    if payload.get("text") != text:
        return "the answer does not carry the new text"
    return None


def _status(response) -> str:
    """A non-200 answer: its status and the app's reason (a JSON answer's ``error``, an HTML
    page's message), and for no answer at all (status 0) the client's error."""
    error = getattr(response, "error", None)
    if response.status_code:
        text = response.text or ""
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            found = re.search(r'(?:class="message[^"]*"|role="alert")[^>]*>([^<]{1,120})', text)
            error = found.group(1).strip() if found else None
    return f"status {response.status_code}" + (f" ({error!s:.120})" if error else "")
