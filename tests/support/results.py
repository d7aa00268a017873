"""Helpers for the results tests: open the embedded screen, call its frame endpoints, and read
the fake portal's records of what reached Bitrix24 and as whom."""

from __future__ import annotations

import re
from urllib.parse import urlencode

from tests.celery_worker import kill_worker, start_worker, stop_worker  # noqa: F401 - used by tests
from tests.support.portals import install, post_frame

ANNA, BORIS = 1, 2
"""The `portal` fixture's admin and ordinary user."""
TASK_TITLE = "Prepare the quarterly report"
FRAME_TOKEN = re.compile(r'data-frame-token="([^"]+)"')
WRITE_METHODS = ("tasks.task.result.add", "tasks.task.result.update", "tasks.task.result.delete")
UNLIMITED = "100000/100000"


def frame_token(response) -> str:
    """The frame token the screen's HTML carries on `<main>`."""
    match = FRAME_TOKEN.search(response.content.decode())
    assert match, response.content.decode()[:2000]
    return match.group(1)


def installed(client, portal, user_id: int = 1) -> None:
    assert install(client, portal, user_id).status_code == 200


def a_task(portal, *, title: str = TASK_TITLE, results=()) -> int:
    """A task everyone on the portal can see, with `results` in that order: texts (Anna's) or
    `(author_id, text)` pairs. Returns the task's id."""
    task_id = portal.add_task(title=title)
    for result in results:
        author_id, text = (ANNA, result) if isinstance(result, str) else result
        portal.add_result(task_id, author_id=author_id, text=text)
    return task_id


def installed_task(
    client, portal, *, user_id: int = ANNA, title: str = TASK_TITLE, results=()
) -> int:
    """The app installed by `user_id` (Anna, the admin, unless told) and then `a_task`."""
    installed(client, portal, user_id)
    return a_task(portal, title=title, results=results)


def post_screen(
    client,
    portal,
    user_id: int = ANNA,
    *,
    placement: str = "TASK_VIEW_TAB",
    options: dict | None = None,
    lang: str = "en",
):
    """POST the placement entry as `user_id` opening the app in `placement`; returns the
    response whatever its status."""
    return post_frame(
        client, *portal.frame_post(user_id, placement=placement, options=options, lang=lang)
    )


def open_screen(client, portal, user_id: int, task_id: int, lang: str = "en"):
    """Open the app in the task card as `user_id`; returns (response, frame token)."""
    response = post_screen(client, portal, user_id, options={"taskId": str(task_id)}, lang=lang)
    assert response.status_code == 200, response.content.decode()[:2000]
    return response, frame_token(response)


def frame_post(client, token: str, path: str, data: dict | None = None, *, as_json=False):
    """POST to a frame endpoint form-encoded, as the screen's script sends its forms."""
    extra = {"HTTP_X_FRAME_TOKEN": token}
    if as_json:
        extra["HTTP_ACCEPT"] = "application/json"
    return client.post(
        path,
        urlencode(data or {}, doseq=True),
        content_type="application/x-www-form-urlencoded",
        **extra,
    )


def frame_get(client, token: str, path: str, *, as_json=False):
    extra = {"HTTP_X_FRAME_TOKEN": token}
    if as_json:
        extra["HTTP_ACCEPT"] = "application/json"
    return client.get(path, **extra)


def add(client, token: str, task_id: int, text: str, **kwargs):
    return frame_post(
        client, token, "/b24/app/results/add/", {"task": task_id, "text": text}, **kwargs
    )


def edit(client, token: str, task_id: int, result_id: int, text: str, **kwargs):
    return frame_post(
        client,
        token,
        f"/b24/app/results/{result_id}/edit/",
        {"task": task_id, "text": text},
        **kwargs,
    )


def delete(client, token: str, task_id: int, result_id: int, **kwargs):
    return frame_post(
        client, token, f"/b24/app/results/{result_id}/delete/", {"task": task_id}, **kwargs
    )


def html(response) -> str:
    return response.content.decode()


def writes(portal, method: str | None = None) -> list[dict]:
    """REST 3.0 write requests the portal received (all of them, or of one method)."""
    names = (method,) if method else WRITE_METHODS
    return [r for r in portal.requests if r["api"] == "v3" and (r["method_name"] or "") in names]


def acting_user(fake, record: dict) -> int | None:
    """The Bitrix24 user a recorded REST request acted as: the owner of its `auth` token."""
    body = record.get("body") if isinstance(record.get("body"), dict) else {}
    with fake.lock:
        token = fake.access_tokens.get(body.get("auth"))
        return token.user_id if token is not None else None


def applied(portal, key: str) -> list[dict]:
    """Requests under `key` that the portal carried out (200, not an idempotent replay)."""
    return carried_out(r for r in writes(portal) if r["idempotency_key"] == key)


def carried_out(records) -> list[dict]:
    """Those of the recorded write requests that the portal carried out (200, not a replay)."""
    return [r for r in records if r["status"] == 200 and not r["replayed"]]


def writes_by_key(portal) -> dict[str, list[dict]]:
    """REST 3.0 write requests by `Idempotency-Key`, in the order they arrived: one pass over
    the portal's records, for checks of many changes at once."""
    by_key: dict[str, list[dict]] = {}
    for record in writes(portal):
        by_key.setdefault(record["idempotency_key"], []).append(record)
    return by_key


def texts(portal, task_id: int) -> list[str]:
    return sorted(item["text"] for item in portal.results(task_id))
