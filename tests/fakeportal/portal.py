"""One fake Bitrix24 portal: its data, its HTTP listener and the test-facing API."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime
from urllib.parse import urlencode

from . import events, oauth, pages, rest, rest3
from .limits import LeakyBucket, OperatingBudget
from .rest import ClassicError, time_block
from .server import DROP, Listener, Request, Response
from .state import (
    ACCESS_TTL_S,
    REFRESH_TTL_S,
    AccessToken,
    ChatMessage,
    FrameSession,
    PlacementBinding,
    RefreshToken,
    ResultItem,
    Task,
    User,
)
from .transport import TransportFaults
from .util import iso, issued, make_tz, new_hex, new_token, php_json

TASK_CARD_PLACEMENTS = ("TASK_VIEW_TAB", "TASK_VIEW_SIDEBAR", "TASK_VIEW_TOP_PANEL")


class FakePortal:
    """A Bitrix24 portal (tenant) with the app installed, served on 127.0.0.1.

    Create it with ``FakeBitrix.add_portal``. All mutations hold ``fake.lock``.
    """

    def __init__(
        self,
        fake,
        member_id=None,
        rate_limit=(50, 2.0),
        port=0,
        scopes="task,tasks,placement,user_brief",
        status="F",
        lang="en",
        tz_offset_minutes=180,
    ):
        self.fake = fake
        self.member_id = member_id or new_hex(16)
        self.scopes = scopes
        self.status = status
        self.lang = lang
        self.tz = make_tz(tz_offset_minutes)
        self.application_token = issued(new_hex(16))
        self.installed = False
        self.uninstalled = False
        self.app_version = 1
        self.previous_version: int | None = None
        self.payment_required = False
        self.strict_handlers = False  # True: refuse loopback handler URLs like real Bitrix24
        # Not None: `profile` answers this `ID` (any JSON value) instead of the caller's id, for
        # tests of what the app makes of an odd one ("²" is a digit to str.isdigit()).
        self.profile_id: object = None
        # The most items one page of tasks.task.result.list holds, whatever `limit` asks
        # (None: 1000). Real portals cap tasks.task.list pages at 50 (§5.2); this one's cap is
        # undocumented, so tests try the plausible ones.
        self.result_page_cap: int | None = None
        # True: an Idempotency-Key replay must repeat the whole body, `auth` included, so a
        # resend with a refreshed token is 422 IDEMPOTENCYKEYREUSEDEXCEPTION (§5.2 is silent).
        self.idempotency_whole_body = False
        # True: Idempotency-Key is ignored (every request is carried out), as no documented
        # portal does; for tests of what notices it.
        self.idempotency_ignored = False
        # What an app update does to the app's bindings (§4.3: event bindings are removed; when,
        # and whether placements go too, is not documented): "events_after" (after the
        # ONAPPUPDATE answer), "events_before", "all_after", "all_before" or "kept".
        self.bindings_on_update = "events_after"
        # `Set-Cookie` values added to every REST answer, as a portal's PHP session or its
        # balancer may set them (nothing documents whether REST answers carry cookies).
        self.answer_cookies: list[str] = []
        # Frame commands the page JS records but never answers (a parent that does not answer).
        self.unanswered_commands: set[str] = set()
        self.created_at = fake.now()

        self.users: dict[int, User] = {}
        self.tasks: dict[int, Task] = {}
        self.results_by_id: dict[int, ResultItem] = {}
        self.chat_messages: dict[int, ChatMessage] = {}
        self.placements: list[PlacementBinding] = []
        self.event_bindings: list = []
        self.webhooks: dict[str, tuple[int, set[str]]] = {}
        self.frames: dict[str, FrameSession] = {}
        self.idempotency: dict = {}

        self.requests: list[dict] = []
        self.sent_events: list[dict] = []
        self.limit_hits = 0
        self.latency_s = 0.0
        # An HTTP status (503, 502...) every REST call is answered with, as a gateway error page,
        # after `latency_s`: a portal that is down behind its proxy. Unlike `go_down`, each
        # attempt reaches the fake and is recorded (`injected` "unavailable"). None: serving.
        self.unavailable_status: int | None = None
        self.operating_limit_s = 480.0
        self.default_method_cost = 0.01
        self.method_cost: dict[str, float] = {}
        self.bucket = LeakyBucket(int(rate_limit[0]), float(rate_limit[1]), fake.now)
        self.operating = OperatingBudget(fake.now)

        self._ids: defaultdict[str, int] = defaultdict(int)
        # Id used as event_handler_id for events sent to the app card's handler URL.
        self.card_handler_id = self.next_id("event_binding")
        self._failures: list[dict] = []
        # Drip, huge answers, never answering: see transport.py.
        self.transport = TransportFaults()
        self._listeners: list[Listener] = [self._new_listener(port)]
        self._aliases: list[Listener] = []
        self._redirect_origin: str | None = None

    # ---- addresses

    def _new_listener(self, port: int) -> Listener:
        listener = Listener(None, self.fake.host, port, name="portal")
        listener.app = lambda req: self._dispatch(req, listener)
        return listener.start()

    @property
    def url(self) -> str:
        return self._listeners[-1].url

    @property
    def domain(self) -> str:
        return self._listeners[-1].netloc

    @property
    def port(self) -> int:
        return self._listeners[-1].port

    @property
    def client_endpoint(self) -> str:
        return self.url + "/rest/"

    @property
    def lock(self):
        return self.fake.lock

    def next_id(self, kind: str) -> int:
        with self.fake.lock:
            self._ids[kind] += 1
            return self._ids[kind]

    def iso(self, ts: float) -> str:
        return iso(ts, self.tz)

    # ---- data setup

    def add_user(
        self, name="User", last_name="", admin=False, email=None, active=True, lang=None
    ) -> int:
        with self.lock:
            uid = self.next_id("user")
            self.users[uid] = User(
                uid,
                name,
                last_name,
                admin,
                email if email is not None else f"user{uid}@example.test",
                active,
                lang or self.lang,
            )
            return uid

    def add_task(
        self, title="Task", description="", created_by=None, responsible_id=None, members=None
    ) -> int:
        """``members``: user ids with access (admins always have access); None = everyone."""
        with self.lock:
            tid = self.next_id("task")
            first = min(self.users) if self.users else 1
            self.tasks[tid] = Task(
                tid,
                title,
                description,
                created_by or first,
                responsible_id or created_by or first,
                set(members) if members is not None else None,
            )
            return tid

    def delete_task(self, task_id: int) -> None:
        with self.lock:
            self.tasks.pop(task_id, None)

    def complete_task(self, task_id: int) -> None:
        """Completing a task closes its results (they stay closed if it is reopened)."""
        with self.lock:
            self.tasks[task_id].completed = True
            for item in self.results_by_id.values():
                if item.task_id == task_id:
                    item.status = "closed"

    def add_result(
        self, task_id: int, author_id: int, text: str = "Done", created_at=None, message_id=None
    ) -> int:
        """Create a result directly (no validation). ``created_at``: unix time,
        datetime or ISO string; default now."""
        if isinstance(created_at, datetime):
            created_at = created_at.timestamp()
        elif isinstance(created_at, str):
            created_at = datetime.fromisoformat(created_at).timestamp()
        with self.lock:
            return self.create_result(task_id, author_id, text, created_at, message_id).id

    def create_result(
        self, task_id, author_id, text, created_at=None, message_id=None
    ) -> ResultItem:
        with self.lock:
            rid = self.next_id("result")
            item = ResultItem(
                rid,
                task_id,
                text,
                author_id,
                self.fake.now() if created_at is None else float(created_at),
                message_id=message_id,
            )
            task = self.tasks.get(task_id)
            if task is not None and task.completed:
                item.status = "closed"
            self.results_by_id[rid] = item
            return item

    def delete_result(self, result_id: int) -> None:
        with self.lock:
            self.results_by_id.pop(result_id, None)

    def set_result_status(self, result_id: int, status: str) -> None:
        with self.lock:
            self.results_by_id[result_id].status = status

    def add_chat_message(self, task_id, author_id, text="Message") -> int:
        """A message in the task's chat (``task_id=None``: a chat outside any task)."""
        with self.lock:
            mid = self.next_id("message")
            self.chat_messages[mid] = ChatMessage(mid, task_id, author_id, text)
            return mid

    def add_webhook(self, user_id: int, scopes=None) -> str:
        """An inbound webhook for ``user_id``; returns its base URL ``.../rest/{uid}/{code}/``."""
        with self.lock:
            code = issued(new_hex(8))
            granted = scopes if scopes is not None else self.scopes
            if isinstance(granted, str):
                granted = granted.split(",")
            self.webhooks[code] = (user_id, {s.strip() for s in granted if s.strip()})
            return f"{self.url}/rest/{user_id}/{code}/"

    def bind_placement(
        self, placement: str, handler=None, title="", lang_all=None, options=None
    ) -> None:
        """Register a placement as if the app had called placement.bind."""
        with self.lock:
            handler = handler or self.fake.app_url + "/b24/app/"
            self.placements = [
                b
                for b in self.placements
                if not (b.placement == placement and b.handler == handler)
            ]
            self.placements.append(
                PlacementBinding(
                    placement.upper(),
                    handler,
                    title,
                    lang_all=lang_all or {},
                    options=options or {},
                )
            )

    def placement_binding(self, placement: str) -> PlacementBinding | None:
        with self.lock:
            for b in self.placements:
                if b.placement == placement.upper():
                    return b
            return None

    # ---- queries used by the REST code

    def can_access_task(self, user: User, task: Task) -> bool:
        return user.admin or task.members is None or user.id in task.members

    def result_rights(self, item: ResultItem, user_id: int | None) -> dict:
        own = user_id is not None and item.author_id == user_id
        return {"edit": own, "remove": own}

    def results_of(self, task_id: int) -> list[ResultItem]:
        return sorted(
            (r for r in self.results_by_id.values() if r.task_id == task_id), key=lambda r: r.id
        )

    def results(self, task_id: int, as_user: int | None = None) -> list[dict]:
        """Current result items of a task in the v3 item shape (``rights`` only
        when ``as_user`` is given)."""
        with self.lock:
            return [rest3.item_dict(self, r, as_user) for r in self.results_of(task_id)]

    def classic_item(self, item: ResultItem) -> dict:
        from html import escape

        return {
            "id": item.id,
            "taskId": item.task_id,
            "commentId": item.comment_id,
            "createdBy": item.author_id,
            "createdAt": self.iso(item.created_at),
            "updatedAt": self.iso(item.updated_at) if item.updated_at is not None else None,
            "status": 1 if item.status == "closed" else 0,
            "text": item.text,
            "formattedText": escape(item.text),
            "files": list(item.file_ids),
        }

    # ---- tokens

    def issue_tokens(self, user_id: int, scope: str | None = None) -> dict:
        """Fresh access + refresh token for a user, as the §2.2 token response."""
        fake = self.fake
        with self.lock:
            if user_id not in self.users:
                raise KeyError(f"no user {user_id} on portal {self.member_id}")
            now = fake.now()
            scope = scope or self.scopes
            access = AccessToken(new_token(), self.member_id, user_id, scope, now + ACCESS_TTL_S)
            refresh = RefreshToken(new_token(), self.member_id, user_id, scope, now + REFRESH_TTL_S)
            fake.access_tokens[access.token] = access
            fake.refresh_tokens[refresh.token] = refresh
            return {
                "access_token": access.token,
                "expires": int(access.expires_at),
                "expires_in": ACCESS_TTL_S,
                "scope": scope,
                "domain": fake.oauth_host,
                "server_endpoint": fake.server_endpoint,
                "status": self.status,
                "client_endpoint": self.client_endpoint,
                "member_id": self.member_id,
                "user_id": user_id,
                "refresh_token": refresh.token,
            }

    def other_app_access_token(self, user_id: int, client_id: str = "local.other.app") -> str:
        """An access token another app installed on this portal holds for ``user_id``: REST
        methods such as ``profile`` accept it as they accept ours; only ``app.info`` on the
        OAuth server tells the two apps apart (its ``client_id``)."""
        with self.lock:
            if user_id not in self.users:
                raise KeyError(f"no user {user_id} on portal {self.member_id}")
            token = AccessToken(
                new_token(),
                self.member_id,
                user_id,
                self.scopes,
                self.fake.now() + ACCESS_TTL_S,
                client_id=client_id,
            )
            self.fake.access_tokens[token.token] = token
            return token.token

    def expire_access_tokens(self, user_id: int | None = None) -> int:
        """Make the access tokens issued so far expired (-> 401 expired_token)."""
        with self.lock:
            now = self.fake.now()
            count = 0
            for tok in self.fake.access_tokens.values():
                if tok.member_id == self.member_id and (user_id is None or tok.user_id == user_id):
                    if tok.expires_at > now - 1:
                        tok.expires_at = now - 1
                        count += 1
            return count

    def revoke_refresh_tokens(self, user_id: int | None = None) -> int:
        """Kill the refresh tokens issued so far (-> invalid_grant)."""
        with self.lock:
            count = 0
            for tok in self.fake.refresh_tokens.values():
                if tok.member_id == self.member_id and (user_id is None or tok.user_id == user_id):
                    tok.revoked = True
                    count += 1
            return count

    def _revoke_all_tokens(self) -> None:
        with self.lock:
            for tok in self.fake.access_tokens.values():
                if tok.member_id == self.member_id:
                    tok.revoked = True
            for tok in self.fake.refresh_tokens.values():
                if tok.member_id == self.member_id:
                    tok.revoked = True
            for code in self.fake.codes.values():
                if code.member_id == self.member_id:
                    code.used = True

    # ---- frames (§3.2)

    def _default_options(self, placement: str, user_id: int) -> tuple[dict, str]:
        if placement in TASK_CARD_PLACEMENTS:
            return {"taskId": "1"}, ""
        if placement == "TASK_LIST_CONTEXT_MENU":
            return {"ID": "1"}, f"/company/personal/user/{user_id}/tasks/"
        if placement in ("TASK_USER_LIST_TOOLBAR", "TASK_ROBOT_DESIGNER_TOOLBAR"):
            return {"USER_ID": str(user_id)}, f"/company/personal/user/{user_id}/tasks/"
        if placement == "TASK_GROUP_LIST_TOOLBAR":
            return {"GROUP_ID": "1"}, "/workgroups/group/1/tasks/"
        if placement == "DEFAULT":
            return {}, "/marketplace/app/"
        return {}, "/"

    def build_frame(
        self,
        user_id: int,
        placement="TASK_VIEW_TAB",
        options=None,
        lang="en",
        handler=None,
        uri=None,
    ) -> tuple[str, dict, FrameSession]:
        fake = self.fake
        placement = placement.upper()
        with self.lock:
            if handler is None:
                binding = self.placement_binding(placement)
                handler = binding.handler if binding else fake.app_url + "/b24/app/"
            defaults, default_uri = self._default_options(placement, user_id)
            opts = dict(defaults if options is None else options)
            # Values are strings in the real payload (§3.3).
            opts = {
                k: (val if isinstance(val, (dict, list)) else str(val)) for k, val in opts.items()
            }
            if "URI" not in opts:
                if uri is None and placement in TASK_CARD_PLACEMENTS:
                    task_part = opts.get("taskId", "")
                    uri = f"/company/personal/user/{user_id}/tasks/task/view/{task_part}/"
                opts["URI"] = uri if uri is not None else default_uri
            tokens = self.issue_tokens(user_id)
            app_sid = new_hex(16)
            session = FrameSession(app_sid, user_id, placement, opts, handler, lang)
            self.frames[app_sid] = session
            query = urlencode(
                [("DOMAIN", self.domain), ("PROTOCOL", "0"), ("LANG", lang), ("APP_SID", app_sid)]
            )
            url = handler + ("&" if "?" in handler else "?") + query
            fields = {
                "AUTH_ID": tokens["access_token"],
                "AUTH_EXPIRES": str(ACCESS_TTL_S),
                "REFRESH_ID": tokens["refresh_token"],
                "SERVER_ENDPOINT": fake.server_endpoint,
                "APPLICATION_TOKEN": self.application_token,
                "APPLICATION_SCOPE": self.scopes,
                "member_id": self.member_id,
                "status": self.status,
                "PLACEMENT": placement,
                "PLACEMENT_OPTIONS": php_json(opts),
            }
            return url, fields, session

    def frame_post(
        self, user_id: int, placement="TASK_VIEW_TAB", options=None, lang="en", handler=None
    ) -> tuple[str, dict]:
        """The exact POST Bitrix24 sends to open the app in a frame (§3.2):
        ``(url with DOMAIN/PROTOCOL/LANG/APP_SID, form fields)``. Works whether
        or not the app is installed."""
        url, fields, _ = self.build_frame(user_id, placement, options, lang, handler)
        return url, fields

    def install_post(self, user_id: int, lang="en") -> tuple[str, dict]:
        """The installer-URL POST (PLACEMENT=DEFAULT) of §1.3."""
        url, fields, _ = self.build_frame(
            user_id,
            "DEFAULT",
            {},
            lang,
            self.fake.app_url + "/b24/install/",
            uri="/marketplace/install/",
        )
        return url, fields

    # ---- lifecycle and events

    def mark_installed(self) -> None:
        """As if the install wizard called installFinish (§1.3)."""
        with self.lock:
            self.installed = True
            self.uninstalled = False

    def _event_binding(self, event: str):
        for b in self.event_bindings:
            if b.event == event and not b.offline:
                return b
        return None

    def event_body(
        self, event: str, user_id=1, data=None, application_token=None, extra_auth=None
    ) -> list[tuple[str, str]]:
        """The (key, value) pairs of an event POST body with PHP bracket keys."""
        fake = self.fake
        event = event.upper()
        with self.lock:
            binding = self._event_binding(event)
            if binding is not None and binding.auth_type:
                user_id = binding.auth_type
            handler_id = binding.id if binding is not None else self.card_handler_id
            base = {
                "domain": self.domain,
                "server_endpoint": fake.server_endpoint,
                "client_endpoint": self.client_endpoint,
                "member_id": self.member_id,
                "application_token": application_token or self.application_token,
            }
            if event == "ONAPPUNINSTALL":
                defaults = {"LANGUAGE_ID": self.lang, "CLEAN": 1}
                auth = base  # API access is revoked before this event: no tokens
            else:
                if event == "ONAPPINSTALL":
                    defaults = {
                        "VERSION": str(self.app_version),
                        "ACTIVE": "Y",
                        "INSTALLED": "Y" if self.installed else "N",
                        "LANGUAGE_ID": self.lang,
                    }
                elif event == "ONAPPUPDATE":
                    defaults = {
                        "VERSION": str(self.app_version),
                        "PREVIOUS_VERSION": str(self.previous_version or self.app_version),
                        "LANGUAGE_ID": self.lang,
                    }
                else:
                    defaults = {}
                auth = {"scope": self.scopes, "status": self.status, **base}
                if user_id is not None:
                    tokens = self.issue_tokens(user_id)
                    auth.update(
                        access_token=tokens["access_token"],
                        expires=tokens["expires"],
                        expires_in=tokens["expires_in"],
                        user_id=user_id,
                    )
                    # refresh_token comes only with events that need long-term access (§4.2).
                    if event in ("ONAPPINSTALL", "ONAPPUPDATE", "ONOFFLINEEVENT"):
                        auth["refresh_token"] = tokens["refresh_token"]
            merged = dict(defaults)
            for key, value in (data or {}).items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            for key, value in (extra_auth or {}).items():
                if value is None:
                    auth.pop(key, None)
                else:
                    auth[key] = value
            return events.build_pairs(event, handler_id, merged, int(fake.now()), auth)

    def _event_url(self, event: str, url: str | None) -> str:
        if url:
            return url
        binding = self._event_binding(event)
        return binding.handler if binding is not None else self.fake.app_url + "/b24/events/"

    def send_event(
        self, event: str, url=None, user_id=1, data=None, application_token=None, extra_auth=None
    ) -> tuple[int | None, str]:
        """POST an event to the app. Returns (HTTP status, body); status is None
        when the app could not be reached or the event was not delivered (an
        ordinary event while the app is not installed, §1.3)."""
        event = event.upper()
        with self.lock:
            if event == "ONAPPUPDATE":
                self.previous_version = self.app_version
                self.app_version += 1
                self.application_token = issued(new_hex(16))
                if self.bindings_on_update.endswith("_before"):
                    self._drop_bindings_for_update()
            if event not in events.LIFECYCLE_EVENTS and not self.installed:
                self.sent_events.append(
                    {
                        "event": event,
                        "url": url,
                        "pairs": [],
                        "status": None,
                        "body": "not delivered: app not installed",
                    }
                )
                return None, "not delivered: app not installed"
            target = self._event_url(event, url)
            pairs = self.event_body(event, user_id, data, application_token, extra_auth)
        status, body = events.post_form(target, pairs, self.fake.event_timeout_s)
        with self.lock:
            self.sent_events.append(
                {"event": event, "url": target, "pairs": pairs, "status": status, "body": body}
            )
            if event == "ONAPPUPDATE" and self.bindings_on_update.endswith("_after"):
                # "when an app is deleted or updated its event bindings are removed" (§4.3)
                self._drop_bindings_for_update()
        return status, body

    def _drop_bindings_for_update(self) -> None:
        with self.lock:
            if self.bindings_on_update == "kept":
                return
            self.event_bindings.clear()
            if self.bindings_on_update.startswith("all_"):
                self.placements.clear()

    def update_app(self, url=None) -> tuple[int | None, str]:
        """A new app version: rotate application_token, send ONAPPUPDATE."""
        return self.send_event("ONAPPUPDATE", url=url)

    def uninstall(self, clean=True, url=None) -> tuple[int | None, str]:
        """Remove the app: revoke every token, drop bindings, send ONAPPUNINSTALL."""
        with self.lock:
            self._revoke_all_tokens()
            target = self._event_url("ONAPPUNINSTALL", url)
            pairs = self.event_body("ONAPPUNINSTALL", None, {"CLEAN": 1 if clean else 0})
            self.installed = False
            self.uninstalled = True
            self.placements.clear()
            self.event_bindings.clear()
        status, body = events.post_form(target, pairs, self.fake.event_timeout_s)
        with self.lock:
            self.sent_events.append(
                {
                    "event": "ONAPPUNINSTALL",
                    "url": target,
                    "pairs": pairs,
                    "status": status,
                    "body": body,
                }
            )
        return status, body

    def reinstall(self, user_id=1, url=None, finish=True) -> tuple[int | None, str]:
        """Install again after ``uninstall``: new application_token, then
        ONAPPINSTALL for ``user_id``. ``finish=False`` leaves it waiting for installFinish."""
        with self.lock:
            self.uninstalled = False
            self.installed = bool(finish)
            self.application_token = issued(new_hex(16))
        return self.send_event("ONAPPINSTALL", url=url, user_id=user_id)

    # ---- faults and transport

    def fail_next(
        self,
        count=1,
        error="QUERY_LIMIT_EXCEEDED",
        method=None,
        status=None,
        operating_reset_at=None,
        delay_s=None,
        expire_tokens=False,
    ) -> None:
        """Queue errors for the next ``count`` REST calls (of ``method`` if given).

        ``error``: any code of §6 (classic shape, its HTTP status) or a
        ``BITRIX_REST_V3_EXCEPTION_*`` code (v3 shape); ``"timeout"``: sleep
        ``delay_s`` (default ``fake.timeout_delay_s``) then answer 503;
        ``"drop"``: close the connection without answering; ``"lost_response"``: carry
        the call out, then close the connection without answering (the change is
        applied, its answer lost); ``"500"``/``"502"``...: that status with an HTML body
        (a gateway error). ``expire_tokens``: the caller's access tokens expire as the
        fault happens (the retry has to refresh first, and carries a new ``auth``)."""
        with self.lock:
            for _ in range(count):
                self._failures.append(
                    {
                        "error": error,
                        "method": method.lower() if method else None,
                        "status": status,
                        "operating_reset_at": operating_reset_at,
                        "delay_s": delay_s,
                        "expire_tokens": expire_tokens,
                    }
                )

    def _pop_failure(self, method: str) -> dict | None:
        with self.lock:
            for i, failure in enumerate(self._failures):
                if failure["method"] is None or failure["method"] == method.lower():
                    return self._failures.pop(i)
            return None

    def set_rate_limit(self, burst: int, drain_per_s: float) -> None:
        with self.lock:
            self.bucket.configure(int(burst), float(drain_per_s))

    def check_operating(self, op_key) -> None:
        """429 OPERATION_TIME_LIMIT when the method's budget is used up (§7.2).
        [UNCONFIRMED] the 429 body carries a ``time`` block with
        ``operating_reset_at``; the reference only documents it on successes."""
        if self.operating.blocked(op_key, self.operating_limit_s):
            now = self.fake.now()
            raise ClassicError("OPERATION_TIME_LIMIT", time=time_block(self, now, now, op_key))

    def charge_operating(self, op_key, method: str) -> None:
        costs = {k.lower(): v for k, v in self.method_cost.items()}
        self.operating.charge(op_key, costs.get(method.lower(), self.default_method_cost))

    def go_down(self) -> None:
        """Stop listening: connections are refused until ``come_back``."""
        self._listeners[-1].stop()

    def come_back(self) -> None:
        """Listen again on the same port."""
        self._listeners[-1].start()

    @property
    def down(self) -> bool:
        return not self._listeners[-1].running

    def change_domain(self) -> str:
        """Move the portal to a new address; the old one answers 302 to the new one."""
        listener = self._new_listener(0)
        with self.lock:
            self._listeners.append(listener)
        return self.domain

    def redirect_to(self, origin: str | None) -> None:
        """Answer every request at the portal's address with a 302 to the same path on
        ``origin`` (anyone who runs a portal can answer what they like); ``None`` stops it."""
        with self.lock:
            self._redirect_origin = origin.rstrip("/") if origin else None

    def alias(self) -> str:
        """Another address serving this portal that ``app.info`` does not name (a mirror the
        portal's owner runs): returns its origin."""
        listener = self._new_listener(0)
        with self.lock:
            self._aliases.append(listener)
        return listener.url

    def stop(self) -> None:
        for listener in [*self._listeners, *self._aliases]:
            listener.stop()

    def calls(self, method=None, api=None) -> list[dict]:
        """Recorded requests, filtered by method name and/or api."""
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or (r["method_name"] or "").lower() == method.lower())
                and (api is None or r["api"] == api)
            ]

    # ---- HTTP dispatch

    def _dispatch(self, req: Request, listener: Listener):
        record = {
            "path": req.path,
            "api": None,
            "method_name": None,
            "http_method": req.method,
            "query": req.query,
            "headers": req.headers,
            "body": req.parsed_body(),
            "raw_body": req.body,
            "status": None,
            "idempotency_key": None,
            "replayed": False,
            "host": listener.netloc,
            "time": self.fake.now(),
            "injected": None,
        }
        if self.transport.unresponsive and req.path.startswith("/rest/"):
            record["injected"] = "unresponsive"
            with self.lock:
                self.requests.append(record)
            self.transport.hold(listener)
            return DROP
        resp = self._route(req, listener, record)
        if resp is not DROP and record["api"] in ("classic", "v3"):
            resp.headers.extend(("Set-Cookie", cookie) for cookie in self.answer_cookies)
            resp = self.transport.shape(resp, record)
        # A lost_response was carried out: its status is what the portal did, not what the
        # client got (nothing; `injected` says so).
        record["status"] = record.pop("done_status", None) if resp is DROP else resp.status
        with self.lock:
            self.requests.append(record)
        return resp

    def _route(self, req: Request, listener: Listener, record: dict):
        path = req.path
        if self._redirect_origin and listener is self._listeners[-1]:
            record["api"] = "redirect"
            return Response.redirect(self._redirect_origin + req.target)
        if listener is not self._listeners[-1] and listener not in self._aliases:
            # Old domain: every request is redirected to the same path on the new host.
            record["api"] = "redirect"
            return Response.redirect(self.url + req.target)
        if path.startswith("/rest/"):
            return self._rest(req, record)
        if path.rstrip("/") == "/oauth/authorize":
            record["api"] = "oauth"
            record["method_name"] = "oauth.authorize"
            return oauth.authorize(self, req)
        record["api"] = "page"
        return pages.handle(self, req)

    def _rest(self, req: Request, record: dict):
        parts = [p for p in req.path[len("/rest/") :].split("/") if p]
        api = "v3" if parts and parts[0] == "api" else "classic"
        if api == "v3":
            parts = parts[1:]
        webhook = None
        if len(parts) == 3 and parts[0].isdigit():
            webhook = (int(parts[0]), parts[1])
            method = parts[2]
        else:
            method = "/".join(parts)
        if api == "classic" and method.lower().endswith(".json"):
            method = method[:-5]
        record["api"] = api
        record["method_name"] = method
        echo = []
        if api == "v3" and req.headers.get("Idempotency-Key") is not None:
            echo = [("Idempotency-Key", req.headers.get("Idempotency-Key"))]
            record["idempotency_key"] = req.headers.get("Idempotency-Key")

        if self.unavailable_status is not None:
            record["injected"] = "unavailable"
            if self.latency_s:
                time.sleep(self.latency_s)
            return oauth._gateway_error(int(self.unavailable_status))
        failure = self._pop_failure(method)
        if failure is not None:
            record["injected"] = failure["error"]
            if failure["error"] != "lost_response":
                if failure["expire_tokens"]:
                    self._expire_caller_tokens(req)
                return self._injected(failure, method, echo)
        if self.latency_s:
            time.sleep(self.latency_s)
        with self.lock:
            if not self.bucket.hit(req.client_ip):
                self.limit_hits += 1
                return ClassicError("QUERY_LIMIT_EXCEEDED").response(headers=echo)
        if api == "v3":
            resp = rest3.handle(self, req, method, webhook, record)
        else:
            resp = rest.handle(self, req, method, webhook, record)
        if failure is None:
            return resp
        if failure["expire_tokens"]:  # a lost_response: carried out, then the answer is lost
            self._expire_caller_tokens(req)
        record["done_status"] = resp.status
        return DROP

    def _expire_caller_tokens(self, req: Request) -> None:
        """Expire every access token of the user whose token the request carries."""
        body = req.parsed_body()
        token = body.get("auth") if isinstance(body, dict) else None
        with self.lock:
            record = self.fake.access_tokens.get(token) if isinstance(token, str) else None
        if record is not None:
            self.expire_access_tokens(record.user_id)

    def _injected(self, failure: dict, method: str, echo: list):
        error = failure["error"]
        if error == "drop":
            return DROP
        if error == "timeout":
            time.sleep(
                failure["delay_s"] if failure["delay_s"] is not None else self.fake.timeout_delay_s
            )
            return oauth._gateway_error(503)
        if error.isdigit():
            return oauth._gateway_error(int(error))
        if error.startswith(rest3.P):
            err = rest3.V3Error(error, status=failure["status"])
            return Response.json(err.payload(), err.status, headers=echo)
        extra = {}
        if error == "OPERATION_TIME_LIMIT":
            now = self.fake.now()
            with self.lock:
                block = time_block(self, now, now, ("app", method.lower()))
            if failure["operating_reset_at"] is not None:
                block["operating_reset_at"] = int(failure["operating_reset_at"])
            # [UNCONFIRMED] a `time` block on the 429 body: not documented; clients
            # should take operating_reset_at from the last successful response.
            extra["time"] = block
        return ClassicError(error, status=failure["status"], **extra).response(headers=echo)
