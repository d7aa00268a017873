"""`manage.py b24 doctor PORTAL`: check a live portal for what the app relies on.

Our fake portal was written from the same reading of the documentation as the app, so where the
documentation is silent the tests cannot tell how a real portal answers. The doctor asks the
real one, through the portal's stored admin account, and says for each thing the app relies on:

* ``ok``: the portal does something the app handles (the line says which answer it was);
* ``differs``: the portal does something the app does not handle, or is not set up as it needs;
* ``unknown``: the answer could not be had (Bitrix24 busy or unreachable, nothing to measure).

With a task id it also writes: it adds a result, edits it, replays the add under its
`Idempotency-Key` with the same and with a refreshed `auth`, and deletes what it made. No line
carries a token.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from django.conf import settings

from b24app.portals import services
from b24app.portals.bindings import bindings_read
from b24app.portals.bitrix import (
    IDEMPOTENCY_KEY_REUSED,
    BitrixAuthError,
    BitrixClient,
    BitrixError,
    BitrixInvalidResponse,
    BitrixUnavailable,
    BitrixValidationError,
    methods,
)
from b24app.portals.bitrix.methods import TaskResult, TrustedAppInfo
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import BACKGROUND_LIMITER_WAIT_S

Verdict = Literal["ok", "differs", "unknown"]
LIST = "tasks.task.result.list"
PROBE_TEXT = "b24 doctor: a check by the app's operator, deleted at once"
LARGEST_PAGE = 1000
"""The page asked for when measuring: the documented maximum of `tasks.task.list` v3."""
NOT_REACHED = frozenset(
    {
        "ERROR_METHOD_NOT_FOUND",
        "BITRIX_REST_V3_EXCEPTION_METHODNOTFOUNDEXCEPTION",
        "BITRIX_REST_V3_EXCEPTION_INSUFFICIENTSCOPEEXCEPTION",
        "insufficient_scope",
    }
)


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str

    def line(self) -> str:
        return f"{self.verdict:<8} {self.name}: {self.detail}"


def doctor_run(*, portal: Portal, task_id: int | None = None) -> Iterator[Check]:
    """Every check against the live portal, in order; one line each."""
    from b24app.portals.selectors import portal_admin_account

    account = portal_admin_account(portal)
    if account is None:
        yield Check(
            "connection",
            "differs",
            "no administrator of this portal has working tokens: an admin opens the app, or "
            "an operator reconnects it",
        )
        return
    run = _Run(portal=portal, account=account)
    yield run.guarded("oauth server", run.oauth)
    yield run.guarded("token refresh", run.refresh)
    yield run.guarded("rest 3.0", run.rest_v3)
    yield run.guarded("scope", run.scope)
    yield run.guarded("page size", lambda: run.page_size(task_id))
    yield run.guarded("bindings", run.bindings)
    if task_id is not None:
        yield from run.writes(task_id)


class _Run:
    def __init__(self, *, portal: Portal, account: Account) -> None:
        self.portal = portal
        self.account = account
        self.info: TrustedAppInfo | None = None

    def guarded(self, name: str, check: Callable[[], Check]) -> Check:
        """Run one check; a Bitrix24 that cannot answer now, or a token that no longer works,
        makes its line `unknown` / `differs` instead of ending the run."""
        try:
            return check()
        except BitrixUnavailable as exc:
            return Check(name, "unknown", f"Bitrix24 did not answer ({exc.code})")
        except BitrixAuthError as exc:
            return Check(name, "differs", f"the stored admin token no longer works ({exc.code})")
        except BitrixError as exc:
            return Check(name, "differs", f"unexpected answer ({exc.code})")

    def client(self) -> BitrixClient:
        self.account = Account.objects.select_related("portal").get(pk=self.account.pk)
        return services.account_client(self.account, limiter_max_wait=BACKGROUND_LIMITER_WAIT_S)

    # -- the OAuth server -------------------------------------------------------------------

    def oauth(self) -> Check:
        name = "oauth server"
        self.client()  # renews an access token that has expired, as the app would
        try:
            info = services.oauth_server().app_info(
                self.portal.oauth_server, self.account.access_token
            )
        except BitrixUnavailable as exc:
            return Check(name, "unknown", f"{self.portal.oauth_server} unreachable ({exc.code})")
        except BitrixError as exc:
            return Check(name, "differs", f"app.info refused the stored token ({exc.code})")
        self.info = methods.trusted_app_info_parse(info)
        seen = {
            "client_id": self.info.client_id,
            "member_id": self.info.member_id,
            "installed": self.info.installed,
        }
        wrong = [
            f"{key} {value!r}"
            for key, value, expected in (
                ("client_id", seen["client_id"], settings.B24_CLIENT_ID),
                ("member_id", seen["member_id"], self.portal.member_id),
                ("installed", seen["installed"], True),
            )
            if value != expected
        ]
        if wrong:
            return Check(name, "differs", "app.info says " + ", ".join(wrong))
        return Check(
            name,
            "ok",
            f"{self.portal.oauth_server} vouches for the install (client {seen['client_id']}, "
            f"member_id {seen['member_id']}, installed)",
        )

    def refresh(self) -> Check:
        name = "token refresh"
        try:
            self.account = services.account_tokens_refresh(account_id=self.account.pk)
        except BitrixUnavailable as exc:
            return Check(name, "unknown", f"no answer ({exc.code}); the app retries later")
        except BitrixError as exc:
            return Check(name, "differs", f"the OAuth server refused the refresh ({exc.code})")
        method = services.oauth_server().token_method(self.portal.oauth_server)
        how = {
            "post": "with a POST form body (secrets stay out of URLs)",
            "get": "with GET query parameters (the server ignored a POST body; the app falls "
            "back to GET for it)",
        }.get(method or "", "")
        return Check(name, "ok", f"renewed once, single use {how}".rstrip())

    # -- REST --------------------------------------------------------------------------------

    def rest_v3(self) -> Check:
        name = "rest 3.0"
        try:
            methods.task_results_page(self.client(), 1, limit=1)
        except (BitrixUnavailable, BitrixAuthError):
            raise
        except BitrixError as exc:
            if exc.code in NOT_REACHED:
                return Check(name, "differs", f"{LIST} is not available to the app ({exc.code})")
            return Check(name, "ok", f"/rest/api/ answers {LIST} (for task 1: {exc.code})")
        return Check(name, "ok", f"/rest/api/ answers {LIST}")

    def scope(self) -> Check:
        name = "scope"
        # The tokens renewed a moment ago say what is granted now; app.info said it before.
        granted = str(self.account.scope or (self.info.scope if self.info else ""))
        scopes = {part.strip() for part in granted.split(",") if part.strip()}
        if not granted:
            return Check(name, "unknown", "neither app.info nor the tokens named the scope")
        lacking = [
            need
            for need, alternatives in (("task", {"task", "tasks"}), ("placement", {"placement"}))
            if not scopes & alternatives
        ]
        if lacking:
            return Check(name, "differs", f"granted {granted!r}, lacks {', '.join(lacking)}")
        return Check(name, "ok", f"granted {granted!r}")

    def bindings(self) -> Check:
        name = "bindings"
        bound = bindings_read(self.client())
        base = (settings.B24_APP_URL or bound.app_url() or "").rstrip("/")
        if not base:
            return Check(name, "differs", "none of the app's bindings is there")
        missing = bound.missing(base)
        if missing:
            return Check(
                name,
                "differs",
                f"not bound to {base}: {', '.join(missing)} (the app binds them again at its "
                "next check: an admin opening it, the daily job, or 'Check bindings' in the admin)",
            )
        return Check(name, "ok", f"Results tab, ONAPPUNINSTALL and ONAPPUPDATE bound to {base}")

    def page_size(self, task_id: int | None) -> Check:
        name = "page size"
        if task_id is None:
            return Check(name, "unknown", "name a task with results: --task ID")
        client = self.client()

        def page(limit: int, offset: int) -> list:
            return methods.task_results_page(
                client, task_id, limit=limit, offset=offset, order={"id": "ASC"}
            )

        try:
            first = page(LARGEST_PAGE, 0)
        except (BitrixUnavailable, BitrixAuthError):
            raise
        except BitrixError as exc:
            return Check(name, "unknown", f"task {task_id} could not be listed ({exc.code})")
        if not first:
            return Check(name, "unknown", f"task {task_id} has no results to measure with")
        more = page(LARGEST_PAGE, len(first))
        if len(first) >= 2:
            second = page(1, 1)
            if [_id(item) for item in second[:1]] != [_id(first[1])]:
                return Check(
                    name,
                    "differs",
                    "pagination.offset is ignored: a listing would show the first page only",
                )
        if more:
            return Check(
                name,
                "ok",
                f"{len(first)} per page when {LARGEST_PAGE} were asked (a cap; the app pages "
                "past it)",
            )
        return Check(name, "ok", f"{len(first)}: all of task {task_id}'s results in one page")

    # -- writes ------------------------------------------------------------------------------

    def writes(self, task_id: int) -> Iterator[Check]:
        made: set[int] = set()
        try:
            yield from self._writes(task_id, made)
        finally:
            if made:
                self._clean_up(made)

    def _writes(self, task_id: int, made: set[int]) -> Iterator[Check]:
        add_key = f"doctor-{uuid.uuid4().hex}"
        body = (task_id, PROBE_TEXT)
        client = self.client()
        try:
            first = _item_id(methods.task_result_add(client, *body, idempotency_key=add_key))
        except BitrixUnavailable as exc:
            yield Check("write add", "unknown", f"Bitrix24 busy ({exc.code})")
            return
        except BitrixError as exc:
            yield Check("write add", "differs", f"tasks.task.result.add refused ({exc.code})")
            return
        made.add(first)
        yield Check("write add", "ok", f"result {first} added to task {task_id}")

        yield self.guarded("write update", lambda: self._update(client, first))
        yield self.guarded("write replay", lambda: self._replay(client, body, add_key, first, made))

        try:
            self.account = services.account_tokens_refresh(account_id=self.account.pk)
        except BitrixError as exc:
            yield Check("write replay, new auth", "unknown", f"no refresh ({exc.code})")
        else:
            yield self._replay_refreshed(body, add_key, first, made)

        yield self.guarded("write delete", lambda: self._delete(made))

    def _update(self, client: BitrixClient, result_id: int) -> Check:
        name = "write update"
        text = PROBE_TEXT + " (edited)"
        try:
            item = methods.task_result_update(
                client, result_id, text, idempotency_key=f"doctor-{uuid.uuid4().hex}"
            )
        except BitrixUnavailable:
            raise
        except BitrixError as exc:
            return Check(name, "differs", f"tasks.task.result.update refused ({exc.code})")
        if item is not None and item.text not in (None, text):
            return Check(name, "differs", "the answer carries another text")
        return Check(name, "ok", f"result {result_id} edited by its author")

    def _replay(
        self, client: BitrixClient, body: tuple[int, str], key: str, first: int, made: set[int]
    ) -> Check:
        name = "write replay"
        again = _item_id(methods.task_result_add(client, *body, idempotency_key=key))
        made.add(again)
        if again == first:
            return Check(name, "ok", "the same key and body were replayed, not applied again")
        return Check(name, "differs", f"the same key and body were applied twice ({again})")

    def _replay_refreshed(
        self, body: tuple[int, str], key: str, first: int, made: set[int]
    ) -> Check:
        name = "write replay, new auth"
        try:
            again = _item_id(methods.task_result_add(self.client(), *body, idempotency_key=key))
        except BitrixValidationError as exc:
            if exc.code == IDEMPOTENCY_KEY_REUSED:
                return Check(
                    name,
                    "ok",
                    "refused as a reused key (422): this portal compares whole bodies, auth "
                    "included; the app reads such a change back",
                )
            return Check(name, "differs", f"refused ({exc.code})")
        except BitrixUnavailable as exc:
            return Check(name, "unknown", f"Bitrix24 busy ({exc.code})")
        except BitrixError as exc:
            return Check(name, "differs", f"refused ({exc.code})")
        made.add(again)
        if again == first:
            return Check(name, "ok", "replayed: the body is compared without auth")
        return Check(name, "differs", f"applied twice after a refresh ({again})")

    def _delete(self, made: set[int]) -> Check:
        name = "write delete"
        client = self.client()
        for result_id in sorted(made):
            try:
                methods.task_result_delete(
                    client, result_id, idempotency_key=f"doctor-{uuid.uuid4().hex}"
                )
            except BitrixUnavailable:
                raise
            except BitrixError as exc:
                return Check(name, "differs", f"result {result_id} not deleted ({exc.code})")
        deleted = ", ".join(str(result_id) for result_id in sorted(made))
        made.clear()
        return Check(name, "ok", f"deleted what the doctor made ({deleted})")

    def _clean_up(self, made: set[int]) -> None:
        """Delete what a check left behind when it stopped early (best effort)."""
        try:
            client = self.client()
            for result_id in sorted(made):
                methods.task_result_delete(
                    client, result_id, idempotency_key=f"doctor-{uuid.uuid4().hex}"
                )
        except BitrixError:
            pass


def _item_id(item: TaskResult | None) -> int:
    if item is None:
        raise BitrixInvalidResponse("INVALID_RESPONSE", "the answer carries no result id")
    return item.id


def _id(item) -> str:
    return str(item.get("id")) if isinstance(item, dict) else repr(item)
