"""Classic REST (v1/v2): ``/rest/{method}`` and ``/rest/{method}.json`` on a
portal listener (§5.1), plus the pieces shared with REST 3.0: authentication
of the caller, the ``time`` block (§6.3) and the system errors (§6).

Handlers run with ``fake.lock`` held (see ``handle``)."""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit

from .server import Request, Response
from .state import AuthContext, EventBinding, PlacementBinding
from .util import get_ci, is_int, iso, parse_php_qs, truthy

# ---- errors

# §6.1 and §6.2: code -> (HTTP status, description). Used for real errors and
# for errors injected with ``portal.fail_next``.
SYSTEM_ERRORS: dict[str, tuple[int, str]] = {
    "INTERNAL_SERVER_ERROR": (500, "Internal server error"),
    "ERROR_UNEXPECTED_ANSWER": (500, "Server returned an unexpected response"),
    "QUERY_LIMIT_EXCEEDED": (503, "Too many requests"),
    "OPERATION_TIME_LIMIT": (429, "Method is blocked due to operation time limit."),
    "ERROR_BATCH_METHOD_NOT_ALLOWED": (405, "Method is not allowed for batch usage"),
    "ERROR_BATCH_LENGTH_EXCEEDED": (400, "Max batch length exceeded"),
    "NO_AUTH_FOUND": (401, "Wrong authorization data"),
    "INVALID_REQUEST": (400, "Https required"),
    "OVERLOAD_LIMIT": (503, "REST API is blocked due to overload"),
    "ACCESS_DENIED": (403, "REST API is available only on commercial plans"),
    "INVALID_CREDENTIALS": (403, "Invalid request credentials"),
    "ERROR_MANIFEST_IS_NOT_AVAILABLE": (404, "Manifest is not available"),
    "insufficient_scope": (
        403,
        "The request requires higher privileges than provided by the access token",
    ),
    "expired_token": (401, "The access token provided has expired."),
    "user_access_error": (403, "The user does not have access to the application"),
    "PORTAL_DELETED": (500, "Portal was deleted"),
    "ERROR_METHOD_NOT_FOUND": (404, "Method not found!"),
    "invalid_token": (401, "Unable to get application by token"),
    "authorization_error": (401, "Unable to authorize user"),
    "APPLICATION_NOT_FOUND": (401, "Application not found"),
    "ERROR_OAUTH": (401, "Application not installed"),
    "NOT_INSTALLED": (401, "Application not installed"),
    "PAYMENT_REQUIRED": (401, "Subscription has been ended"),
    "METHOD_CONFIRM_WAITING": (401, "Waiting for confirmation"),
    "METHOD_CONFIRM_DENIED": (403, "Method call denied"),
    "WRONG_AUTH_TYPE": (
        403,
        "Current authorization type is denied for this method Application context required",
    ),
    "ALLOWED_ONLY_INTRANET_USER": (403, "Allowed only for intranet users"),
    "ACCESS_ERROR": (403, "Access error"),
    "NOT_FOUND": (404, "Not found"),
    "INVALID_ARG_VALUE": (400, "Invalid argument value"),
}


class ClassicError(Exception):
    """An error in the classic shape ``{"error": CODE, "error_description": TEXT}``."""

    def __init__(
        self, code: str, description: str | None = None, status: int | None = None, **extra
    ):
        default_status, default_desc = SYSTEM_ERRORS.get(code, (400, code))
        self.code = code
        self.description = default_desc if description is None else description
        self.status = default_status if status is None else status
        self.extra = extra
        super().__init__(f"{code}: {self.description}")

    def payload(self) -> dict:
        return {"error": self.code, "error_description": self.description, **self.extra}

    def response(self, headers=None) -> Response:
        return Response.json(self.payload(), self.status, headers=headers)


# ---- shared helpers


def time_block(portal, start: float, finish: float, op_key=None) -> dict:
    """§6.3. ``op_key`` adds ``operating`` / ``operating_reset_at`` of that budget."""
    block = {
        "start": start,
        "finish": finish,
        "duration": finish - start,
        "processing": finish - start,
        "date_start": iso(start, portal.tz),
        "date_finish": iso(finish, portal.tz),
    }
    if op_key is not None:
        operating, reset_at = portal.operating.status(op_key)
        block["operating_reset_at"] = reset_at
        block["operating"] = operating
    return block


def authenticate(portal, auth_value, webhook: tuple[int, str] | None) -> AuthContext:
    """Resolve the caller of a portal REST method or raise a 401/403 ClassicError."""
    fake = portal.fake
    if webhook is not None:
        user_id, code = webhook
        hook = portal.webhooks.get(code)
        user = portal.users.get(user_id)
        if hook is None or hook[0] != user_id or user is None or not user.active:
            raise ClassicError("NO_AUTH_FOUND")
        return AuthContext("webhook", user, set(hook[1]) | {"basic"}, webhook_code=code)
    if not isinstance(auth_value, str) or not auth_value:
        raise ClassicError("NO_AUTH_FOUND")
    token = fake.access_tokens.get(auth_value)
    if token is None or token.member_id != portal.member_id:
        raise ClassicError("NO_AUTH_FOUND")
    if token.revoked:
        # [UNCONFIRMED] §6: the code for a token killed by uninstalling the app
        # is not documented. Emulator guess: 401 invalid_token ("Unable to get
        # application by token"); clients then try a refresh, which fails with
        # invalid_grant.
        raise ClassicError("invalid_token")
    if token.expires_at <= fake.now():
        raise ClassicError("expired_token")
    if portal.payment_required:
        raise ClassicError("PAYMENT_REQUIRED")
    user = portal.users.get(token.user_id)
    if user is None or not user.active:
        raise ClassicError("authorization_error")
    scopes = {s.strip() for s in token.scope.split(",") if s.strip()} | {"basic"}
    return AuthContext("app", user, scopes, token=token)


def require_scope(ctx: AuthContext, needed: set[str] | None) -> None:
    if needed and not (needed & ctx.scopes):
        raise ClassicError("insufficient_scope")


def require_app(ctx: AuthContext) -> None:
    if ctx.kind != "app":
        raise ClassicError("WRONG_AUTH_TYPE")


def require_admin(ctx: AuthContext) -> None:
    if not ctx.user.admin:
        raise ClassicError("ACCESS_DENIED", "Access denied!", 403)


def request_params(req: Request) -> dict:
    """Query string merged with a form or JSON body (the body wins)."""
    params = dict(req.query)
    if req.body:
        ctype = req.content_type
        if "json" in ctype:
            try:
                data = req.json()
            except ValueError:
                data = None
            if isinstance(data, dict):
                params.update(data)
        elif ctype.startswith("multipart/"):
            params.update(_parse_multipart(req))
        else:
            params.update(req.form())
    return params


def _parse_multipart(req: Request) -> dict:
    from email.parser import BytesParser
    from email.policy import HTTP

    from .util import parse_php_pairs

    head = f"Content-Type: {req.headers.get('Content-Type')}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + req.body)
    pairs = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            pairs.append((name, part.get_payload(decode=True).decode("utf-8", "replace")))
    return parse_php_pairs(pairs)


# ---- placements / events

# Placement code -> scope needed besides "placement" (None: nothing more).
KNOWN_PLACEMENTS: dict[str, str | None] = {
    "TASK_VIEW_TAB": "task",
    "TASK_VIEW_SIDEBAR": "task",
    "TASK_VIEW_TOP_PANEL": "task",
    "TASK_LIST_CONTEXT_MENU": "task",
    "TASK_USER_LIST_TOOLBAR": "task",
    "TASK_GROUP_LIST_TOOLBAR": "task",
    "TASK_ROBOT_DESIGNER_TOOLBAR": "task",
    "LEFT_MENU": None,
    "REST_APP_URI": None,
    "PAGE_BACKGROUND_WORKER": None,
    "CRM_DEAL_LIST_TOOLBAR": "crm",
    "CRM_DEAL_DETAIL_TAB": "crm",
    "CRM_LEAD_LIST_MENU": "crm",
}
ONE_PER_APP_PLACEMENTS = {"REST_APP_URI", "PAGE_BACKGROUND_WORKER"}

KNOWN_EVENTS = {
    "ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL", "ONAPPPAYMENT", "ONAPPTEST",
    "ONAPPMETHODCONFIRM", "ONOFFLINEEVENT", "ONUSERADD",
    "ONTASKADD", "ONTASKUPDATE", "ONTASKDELETE",
    "ONTASKCOMMENTADD", "ONTASKCOMMENTUPDATE", "ONTASKCOMMENTDELETE",
}  # fmt: skip

_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0"}


def _check_handler_url(portal, value, argument: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ClassicError(
            "ERROR_ARGUMENT", f"Argument '{argument}' is null or empty", 400, argument=argument
        )
    parts = urlsplit(value.strip())
    # [UNCONFIRMED] status of ERROR_UNSUPPORTED_PROTOCOL / ERROR_WRONG_HANDLER_URL:
    # guess 400.
    if parts.scheme not in ("http", "https"):
        raise ClassicError("ERROR_UNSUPPORTED_PROTOCOL", "Unsupported event handler protocol", 400)
    if not parts.hostname:
        raise ClassicError("ERROR_WRONG_HANDLER_URL", "Wrong handler URL", 400)
    # Real Bitrix24 rejects localhost handlers (§3.4). This emulator accepts
    # loopback handlers (http://127.0.0.1:..., http://localhost:...) so the app
    # can run locally; set ``portal.strict_handlers = True`` to reject them.
    if portal.strict_handlers and (
        parts.hostname in _LOOPBACK_HOSTS or parts.hostname.startswith("127.")
    ):
        raise ClassicError("ERROR_WRONG_HANDLER_URL", "Wrong handler URL", 400)
    return value.strip()


def _int_or_zero(value) -> int:
    if is_int(value):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else 0


def _placement_argument(params: dict) -> str:
    value = get_ci(params, "PLACEMENT")
    if value is None or value == "":
        raise ClassicError(
            "ERROR_ARGUMENT", "Argument 'PLACEMENT' is null or empty", 400, argument="PLACEMENT"
        )
    if not isinstance(value, str):
        raise ClassicError(
            "ERROR_ARGUMENT",
            "The value of an argument 'PLACEMENT' must be of type string",
            400,
            argument="PLACEMENT",
        )
    return value.strip().upper()


def m_placement_bind(portal, ctx: AuthContext, params: dict):
    # [UNCONFIRMED] HTTP status of the placement.bind errors: the table says 200,
    # the page header also lists 400. Emulator guess: 400 for all of them.
    require_admin(ctx)
    placement = _placement_argument(params)
    if placement not in KNOWN_PLACEMENTS or (
        KNOWN_PLACEMENTS[placement] and KNOWN_PLACEMENTS[placement] not in ctx.scopes
    ):
        raise ClassicError("ERROR_PLACEMENT_NOT_FOUND", "Placement not found", 400)
    handler = _check_handler_url(portal, get_ci(params, "HANDLER"), "HANDLER")
    title = get_ci(params, "TITLE", "") or ""
    description = get_ci(params, "DESCRIPTION", "") or ""
    group_name = get_ci(params, "GROUP_NAME", "") or ""
    for name, value in (("TITLE", title), ("DESCRIPTION", description), ("GROUP_NAME", group_name)):
        if not isinstance(value, str):
            raise ClassicError(
                "ERROR_ARGUMENT",
                f"The value of an argument '{name}' must be of type string",
                400,
                argument=name,
            )
    lang_all = get_ci(params, "LANG_ALL")
    if lang_all in (None, "", []):
        lang_all = {}
    # [UNCONFIRMED] the error for a malformed LANG_ALL is not documented; guess
    # ERROR_ARGUMENT. Expected: {"en": {"TITLE": ..., "DESCRIPTION": ..., "GROUP_NAME": ...}}.
    if not isinstance(lang_all, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
        for k, v in lang_all.items()
    ):
        raise ClassicError(
            "ERROR_ARGUMENT",
            "The value of an argument 'LANG_ALL' must be of type array",
            400,
            argument="LANG_ALL",
        )
    options = get_ci(params, "OPTIONS")
    if options in (None, "", []):
        options = {}
    if not isinstance(options, dict):
        raise ClassicError(
            "ERROR_ARGUMENT",
            "The value of an argument 'OPTIONS' must be of type array",
            400,
            argument="OPTIONS",
        )
    user_id = _int_or_zero(get_ci(params, "USER_ID"))
    if user_id and placement != "PAGE_BACKGROUND_WORKER":
        raise ClassicError("ERROR_PLACEMENT_USER_MODE", "User mode is not available", 400)
    if placement == "PAGE_BACKGROUND_WORKER" and not options.get("errorHandlerUrl"):
        raise ClassicError("EMPTY_ERROR_HANDLER_URL", "Empty error handler URL", 400)
    same = [
        b
        for b in portal.placements
        if b.placement == placement and b.handler == handler and b.user_id == user_id
    ]
    if (
        placement in ONE_PER_APP_PLACEMENTS
        and not same
        and any(b.placement == placement for b in portal.placements)
    ):
        raise ClassicError("ERROR_PLACEMENT_MAX_COUNT", "Placement max count exceeded", 400)
    binding = PlacementBinding(
        placement, handler, title, description, group_name, lang_all, options, user_id
    )
    if same:
        # [UNCONFIRMED] binding the same (placement, handler) twice: not in the
        # reference. Emulator guess: the registration is replaced, result true.
        portal.placements[portal.placements.index(same[0])] = binding
    else:
        portal.placements.append(binding)
    return True


def m_placement_unbind(portal, ctx: AuthContext, params: dict):
    require_admin(ctx)
    placement = _placement_argument(params)
    handler = get_ci(params, "HANDLER") or None
    user_id = get_ci(params, "USER_ID")
    keep, count = [], 0
    for b in portal.placements:
        match = b.placement == placement and (handler is None or b.handler == handler)
        if match and user_id not in (None, "") and str(b.user_id) != str(user_id):
            match = False
        if match:
            count += 2  # §3.4 quirk: +1 per handler found and +1 per handler deleted
        else:
            keep.append(b)
    portal.placements[:] = keep
    return {"count": count}


def m_placement_get(portal, ctx: AuthContext, params: dict):
    require_admin(ctx)
    return [b.as_dict() for b in portal.placements]


def m_placement_list(portal, ctx: AuthContext, params: dict):
    scope = get_ci(params, "SCOPE")
    codes = []
    for code, needed in KNOWN_PLACEMENTS.items():
        if needed and needed not in ctx.scopes:
            continue
        if scope and needed != scope:
            continue
        codes.append(code)
    return codes


def m_event_bind(portal, ctx: AuthContext, params: dict):
    event = get_ci(params, "event")
    if not isinstance(event, str) or event.upper() not in KNOWN_EVENTS:
        raise ClassicError("ERROR_EVENT_NOT_FOUND", "Event not found", 400)
    event = event.upper()
    event_type = str(get_ci(params, "event_type", "online") or "online").lower()
    offline = event_type == "offline"
    if offline and not ctx.user.admin:
        raise ClassicError(
            "ACCESS_DENIED",
            "Access denied! Offline events binding requires administrator access rights",
            403,
        )
    auth_type = _int_or_zero(get_ci(params, "auth_type"))
    if auth_type and auth_type != ctx.user.id and not ctx.user.admin:
        raise ClassicError(
            "ACCESS_DENIED",
            "Access denied! Event binding with AUTH_TYPE requires administrator access rights",
            403,
        )
    handler = get_ci(params, "handler", "")
    if not offline:
        handler = _check_handler_url(portal, handler, "handler")
    for b in portal.event_bindings:
        if (b.event, b.handler, b.auth_type, b.offline) == (
            event,
            handler or "",
            auth_type,
            offline,
        ):
            # [UNCONFIRMED] HTTP status (the error-codes page only names the code): guess 400.
            raise ClassicError("ERROR_HANDLER_ALREADY_EXIST", "Handler already exists!", 400)
    portal.event_bindings.append(
        EventBinding(
            id=portal.next_id("event_binding"),
            event=event,
            handler=handler or "",
            auth_type=auth_type,
            offline=offline,
            owner_user_id=ctx.user.id,
        )
    )
    return True


def m_event_unbind(portal, ctx: AuthContext, params: dict):
    event = str(get_ci(params, "event", "") or "").upper()
    handler = get_ci(params, "handler", "") or ""
    auth_type = get_ci(params, "auth_type")
    event_type = get_ci(params, "event_type")
    keep, count = [], 0
    for b in portal.event_bindings:
        match = b.event == event and b.handler == handler
        if auth_type is not None:
            match = match and str(b.auth_type) == str(auth_type or "0")
        if event_type:
            match = match and b.offline == (str(event_type).lower() == "offline")
        if match and not ctx.user.admin and b.owner_user_id != ctx.user.id:
            raise ClassicError("ACCESS_DENIED", "Access denied!", 403)
        if match:
            count += 1
        else:
            keep.append(b)
    portal.event_bindings[:] = keep
    return {"count": count}


def m_event_get(portal, ctx: AuthContext, params: dict):
    return [
        b.as_dict()
        for b in portal.event_bindings
        if ctx.user.admin or b.owner_user_id == ctx.user.id
    ]


# ---- users / app


def m_profile(portal, ctx: AuthContext, params: dict):
    u = ctx.user
    if not u.active:
        return {}
    return {
        "ID": str(u.id) if portal.profile_id is None else portal.profile_id,
        "ADMIN": u.admin,
        "NAME": u.name,
        "LAST_NAME": u.last_name,
        "PERSONAL_GENDER": "",
        "TIME_ZONE": "",
    }


def m_user_current(portal, ctx: AuthContext, params: dict):
    u = ctx.user
    created = iso(portal.created_at, portal.tz)
    data = {
        "ID": str(u.id),
        "ACTIVE": u.active,
        "NAME": u.name,
        "LAST_NAME": u.last_name,
        "EMAIL": u.email,
        "LAST_LOGIN": created,
        "DATE_REGISTER": created,
        "IS_ONLINE": "Y",
        "LAST_ACTIVITY_DATE": created.replace("T", " ")[:19],
        "PERSONAL_GENDER": "",
        "PERSONAL_BIRTHDAY": "",
        "WORK_POSITION": "",
        "UF_EMPLOYMENT_DATE": "",
        "UF_DEPARTMENT": [1],
    }
    if not ({"user", "user_basic"} & ctx.scopes):
        data.pop("EMAIL")  # user_brief gives fewer fields (which exactly: not documented)
    return data


def m_user_admin(portal, ctx: AuthContext, params: dict):
    return ctx.user.admin


def m_app_info(portal, ctx: AuthContext, params: dict):
    if ctx.kind != "app":
        raise ClassicError("ACCESS_DENIED", "Access denied! Application context required", 400)
    return {
        "ID": 1,
        "CODE": portal.fake.app_code,
        "VERSION": portal.app_version,
        "STATUS": portal.status,
        "INSTALLED": portal.installed,
        "PAYMENT_EXPIRED": "Y" if portal.payment_required else "N",
        "DAYS": None,
        "LANGUAGE_ID": portal.lang,
        "LICENSE": f"{portal.lang}_project",
        "LICENSE_TYPE": "project",
        "LICENSE_FAMILY": "project",
    }


def m_scope(portal, ctx: AuthContext, params: dict):
    return sorted(ctx.scopes)


# ---- classic task results (§5.4)


def m_task_result_list(portal, ctx: AuthContext, params: dict):
    raw = get_ci(params, "taskId")
    # [UNCONFIRMED] the message for a missing taskId; the "type" message is from §5.4.
    if raw is None or raw == "":
        raise ClassicError("100", "Could not find value for parameter {taskId}", 400)
    if not (is_int(raw) or (isinstance(raw, str) and raw.isdigit())):
        raise ClassicError(
            "100",
            f"Invalid value {raw} to match with parameter {{taskId}}. Should be value of type int.",
            400,
        )
    task = portal.tasks.get(int(raw))
    if task is None or not portal.can_access_task(ctx.user, task):
        raise ClassicError("0", "Access denied.", 400)
    return [portal.classic_item(r) for r in portal.results_of(task.id)]


# ---- batch (§5.1)

_RESULT_REF = re.compile(r"\$result\[([^\]]+)\]((?:\[[^\]]*\])*)")


def _substitute(query: str, results: dict) -> str:
    def repl(m: re.Match) -> str:
        value = results.get(m.group(1))
        for key in re.findall(r"\[([^\]]*)\]", m.group(2)):
            if isinstance(value, dict):
                value = value.get(key)
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                value = None
        if isinstance(value, bool):
            value = "1" if value else ""
        return quote("" if value is None else str(value), safe="")

    return _RESULT_REF.sub(repl, query)


def m_batch(portal, ctx: AuthContext, params: dict):
    cmd = get_ci(params, "cmd", {})
    halt = truthy(get_ci(params, "halt", False))
    if isinstance(cmd, list):
        commands = [(str(i), c) for i, c in enumerate(cmd)]
    elif isinstance(cmd, dict):
        commands = list(cmd.items())
    else:
        commands = []
    if len(commands) > 50:
        raise ClassicError("ERROR_BATCH_LENGTH_EXCEEDED")
    results, errors, totals, nexts, times = {}, {}, {}, {}, {}
    for name, command in commands:
        method, _, query = str(command).partition("?")
        method = method.strip().lower()
        if method.endswith(".json"):
            method = method[:-5]
        inner = parse_php_qs(_substitute(query, results))
        start = portal.fake.now()
        try:
            if method == "batch":
                raise ClassicError("ERROR_BATCH_METHOD_NOT_ALLOWED")
            results[name] = call_method(portal, ctx, method, inner)
        except ClassicError as err:
            errors[name] = {"error": err.code, "error_description": err.description}
            if halt:
                break
        else:
            # Inner results carry no operating fields (§6.3).
            times[name] = time_block(portal, start, portal.fake.now())
    return {
        "result": results or [],
        "result_error": errors or [],
        "result_total": totals or [],
        "result_next": nexts or [],
        "result_time": times or [],
    }


# ---- dispatch

# name -> (handler, scopes (any of), app context only)
METHODS = {
    "profile": (m_profile, None, False),
    "user.current": (m_user_current, {"user", "user_brief", "user_basic"}, False),
    "user.admin": (m_user_admin, None, False),
    "app.info": (m_app_info, None, False),
    "scope": (m_scope, None, False),
    "placement.bind": (m_placement_bind, {"placement"}, True),
    "placement.unbind": (m_placement_unbind, {"placement"}, True),
    "placement.get": (m_placement_get, {"placement"}, True),
    "placement.list": (m_placement_list, {"placement"}, True),
    "event.bind": (m_event_bind, None, True),
    "event.unbind": (m_event_unbind, None, True),
    "event.get": (m_event_get, None, True),
    "batch": (m_batch, None, False),
    "tasks.task.result.list": (m_task_result_list, {"task"}, False),
}


def call_method(portal, ctx: AuthContext, method: str, params: dict):
    """Run one classic method (also used for batch commands): scope, operating
    budget, the method itself, then charge its simulated cost."""
    entry = METHODS.get(method)
    if entry is None:
        # Includes the REST 3.0-only tasks.task.result.add/update/delete/addfromchatmessage:
        # on the classic path they are 404 ERROR_METHOD_NOT_FOUND (§5.2).
        raise ClassicError("ERROR_METHOD_NOT_FOUND")
    fn, scopes, app_only = entry
    if app_only:
        require_app(ctx)
    require_scope(ctx, scopes)
    op_key = (ctx.identity, method)
    if method != "batch":  # the outer batch is not charged (§5.1)
        portal.check_operating(op_key)
    try:
        return fn(portal, ctx, params)
    finally:
        if method != "batch":
            portal.charge_operating(op_key, method)


def handle(portal, req: Request, method: str, webhook, record: dict) -> Response:
    fake = portal.fake
    start = fake.now()
    params = request_params(req)
    method = method.lower()
    with fake.lock:
        try:
            ctx = authenticate(portal, None if webhook else get_ci(params, "auth"), webhook)
            params.pop("auth", None)
            result = call_method(portal, ctx, method, params)
        except ClassicError as err:
            return err.response()
        payload = {
            "result": result,
            "time": time_block(portal, start, fake.now(), (ctx.identity, method)),
        }
    return Response.json(payload)
