"""Sandbox: a fake Bitrix24 portal + OAuth server to try the app by hand.

    python -m tests.fakeportal --app-url http://localhost:8000 --port 8100 \\
        --client-id X --client-secret Y [--oauth-port 8101] [--member-id HEX] [--state FILE]

Starts the OAuth server and one portal with users Anna Smirnova (1, admin) and
Boris Petrov (2), task 1 with two results and task 2 with none; the app is
installed with TASK_VIEW_TAB bound to ``{app_url}/b24/app/``. Once the app
answers ``/healthz`` it gets ONAPPINSTALL for user 1. Runs until Ctrl-C/SIGTERM.

Each start is a new portal (a random member_id) unless ``--member-id`` names it. With
``--state FILE`` a restart is the same portal to the app: the file keeps the portal's
member_id, its application_token and the tokens it issued (so those the app stored still
work), and is written again whenever they change. The tasks and results start afresh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from .fake import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeBitrix
from .state import AccessToken, RefreshToken
from .util import issued

log = logging.getLogger("fakeportal.sandbox")


def build_sandbox(
    fake: FakeBitrix, port: int, status: str, member_id: str | None = None, state=None
):
    """The sandbox portal: ``member_id`` (else the state's, else a random one), and, from a
    ``state`` an earlier start of the same portal kept (`sandbox_state`), its application_token
    and the tokens it issued."""
    state = state or {}
    member_id = member_id or state.get("member_id")
    if state and state.get("member_id") != member_id:
        log.info("the kept state is another portal's (member_id %s): not used", state["member_id"])
        state = {}
    portal = fake.add_portal(member_id=member_id, port=port, status=status)
    if state.get("application_token"):
        portal.application_token = issued(str(state["application_token"]))
    _tokens_restore(fake, portal, state)
    anna = portal.add_user(name="Anna", last_name="Smirnova", admin=True)
    boris = portal.add_user(name="Boris", last_name="Petrov")
    task = portal.add_task(
        title="Prepare the quarterly report",
        description="Collect the figures and send the report to the board.",
        created_by=anna,
        responsible_id=boris,
    )
    portal.add_result(task, author_id=anna, text="Draft figures are in the shared folder.")
    portal.add_result(task, author_id=boris, text="Report sent to the board.")
    portal.add_task(title="Update the onboarding checklist", created_by=anna, responsible_id=anna)
    portal.mark_installed()
    portal.bind_placement("TASK_VIEW_TAB", fake.app_url + "/b24/app/", title="Results")
    return portal


# ---- what a restart keeps (--state)


def sandbox_state(fake: FakeBitrix, portal) -> dict:
    """What a later start needs to be the same portal to the app: its member_id and
    application_token, and the tokens it issued that have not expired."""
    with fake.lock:
        now = fake.now()
        return {
            "member_id": portal.member_id,
            "application_token": portal.application_token,
            **{
                name: [
                    dataclasses.asdict(token)
                    for token in store.values()
                    if token.member_id == portal.member_id and token.expires_at > now
                ]
                for name, store in (
                    ("access_tokens", fake.access_tokens),
                    ("refresh_tokens", fake.refresh_tokens),
                )
            },
        }


def _tokens_restore(fake: FakeBitrix, portal, state: dict) -> None:
    kinds = (("access_tokens", AccessToken), ("refresh_tokens", RefreshToken))
    with fake.lock:
        for name, kind in kinds:
            store = getattr(fake, name)
            for record in state.get(name) or []:
                try:
                    token = kind(**record)
                except TypeError:
                    log.warning("a kept %s entry is not one: skipped", name.rstrip("s"))
                    continue
                if token.member_id == portal.member_id:
                    store[issued(token.token)] = token


def load_state(path: str | None) -> dict:
    """What an earlier start kept in ``path``; {} when there is none (or it cannot be read:
    the sandbox then starts afresh and writes the file again)."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): starting afresh", path, exc)
        return {}
    return state if isinstance(state, dict) else {}


def save_state(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` at once (a new file moved over the old), readable by its
    owner only: it holds tokens, if only the sandbox's own."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


def _member_id(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{1,64}", value):
        raise argparse.ArgumentTypeError("a member_id is 1 to 64 lower-case hex characters")
    return value


def wait_for_app(app_url: str, timeout_s: float, stop: threading.Event) -> int | None:
    """Poll ``{app_url}/healthz``; the last HTTP status seen (None: never answered)."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(app_url + "/healthz", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            # The app answers, but not 200 (503: broker/redis not up; 404: no
            # /healthz yet). Give it a few more seconds, then go ahead anyway.
            if seen is None:
                deadline = min(deadline, time.monotonic() + 5.0)
            seen = err.code
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(1.0)
    return seen


def send_install_event(portal, app_url: str, timeout_s: float, stop: threading.Event) -> None:
    try:
        health = wait_for_app(app_url, timeout_s, stop)
        if stop.is_set():
            return
        if health is None:
            log.warning(
                "app did not answer %s/healthz within %.0f s; ONAPPINSTALL not sent",
                app_url,
                timeout_s,
            )
            return
        status, _ = portal.send_event("ONAPPINSTALL", url=app_url + "/b24/events/", user_id=1)
        log.info("ONAPPINSTALL for user 1 -> %s/b24/events/: HTTP %s", app_url, status)
    except Exception:  # never crash the sandbox
        log.exception("sending ONAPPINSTALL failed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakeportal", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--app-url", default=os.environ.get("B24_APP_URL", "http://localhost:8000"))
    parser.add_argument("--port", type=int, default=8100, help="portal port (0: any free port)")
    parser.add_argument(
        "--oauth-port", type=int, default=8101, help="OAuth server port (0: any free port)"
    )
    parser.add_argument("--client-id", default=os.environ.get("B24_CLIENT_ID", DEFAULT_CLIENT_ID))
    parser.add_argument(
        "--client-secret", default=os.environ.get("B24_CLIENT_SECRET", DEFAULT_CLIENT_SECRET)
    )
    parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the app's /healthz"
    )
    parser.add_argument(
        "--member-id", type=_member_id, help="the portal's member_id (default: a random one)"
    )
    parser.add_argument(
        "--state",
        metavar="FILE",
        help="keep the portal's member_id, application_token and issued tokens in FILE, so "
        "that a restart is the same portal to the app",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s fakeportal %(levelname)s %(message)s"
    )

    app_url = args.app_url.rstrip("/")
    fake = FakeBitrix(client_id=args.client_id, client_secret=args.client_secret, app_url=app_url)
    fake.start(port=args.oauth_port)
    status = "L" if args.client_id.startswith("local.") else "F"
    portal = build_sandbox(fake, args.port, status, args.member_id, load_state(args.state))
    kept: dict = {}

    def keep() -> None:
        nonlocal kept
        if args.state and (state := sandbox_state(fake, portal)) != kept:
            try:
                save_state(args.state, state)
            except OSError as exc:
                log.warning(
                    "cannot write %s (%s): a restart will be another portal", args.state, exc
                )
            kept = state

    keep()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(
        target=send_install_event,
        args=(portal, app_url, args.wait, stop),
        name="fakeportal-oninstall",
        daemon=True,
    ).start()

    print(f"OAuth server: {fake.oauth_url} (server_endpoint {fake.server_endpoint})")
    print(f"Portal: {portal.url} (member_id {portal.member_id}, client_id {fake.client_id})")
    print(f"Sandbox task page: {portal.url}/company/personal/user/1/tasks/task/view/1/")
    print(f"Sandbox app page: {portal.url}/marketplace/app/")
    if args.state:
        print(f"Sandbox state: {args.state} (the same portal at the next start)")
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            keep()
    except KeyboardInterrupt:
        pass
    stop.set()
    keep()
    fake.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
