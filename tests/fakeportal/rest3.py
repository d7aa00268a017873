"""REST 3.0: ``/rest/api/{method}`` on a portal listener (§5.2, §5.3).

JSON body only, ``auth`` in the body, errors in the v3 shape
``{"error": {"code", "message", "validation": [...]}}`` except the system and
authentication errors, which keep the classic shape (the reference's emulator
choice for auth; a guess for 429/503, see ``portal.fail_next``).
"""

from __future__ import annotations

import json

from .rest import ClassicError, authenticate, time_block
from .server import Request, Response
from .state import IDEMPOTENCY_TTL_S, AuthContext, IdempotencyRecord, ResultItem
from .util import MISSING, is_int

P = "BITRIX_REST_V3_EXCEPTION_"
REQUEST_VALIDATION = P + "VALIDATION_REQUESTVALIDATIONEXCEPTION"
DTO_VALIDATION = P + "VALIDATION_DTOVALIDATIONEXCEPTION"
REQUEST_FILTER_VALIDATION = P + "VALIDATION_REQUESTFILTERVALIDATIONEXCEPTION"
INVALID_JSON = P + "INVALIDJSONEXCEPTION"
UNKNOWN_DTO_PROPERTY = P + "UNKNOWNDTOPROPERTYEXCEPTION"
UNKNOWN_FILTER_OPERATOR = P + "UNKNOWNFILTEROPERATOREXCEPTION"
INVALID_FILTER = P + "INVALIDFILTEREXCEPTION"
INVALID_PAGINATION = P + "INVALIDPAGINATIONEXCEPTION"
INVALID_ORDER = P + "INVALIDORDEREXCEPTION"
INVALID_SELECT = P + "INVALIDSELECTEXCEPTION"
ENTITY_NOT_FOUND = P + "ENTITYNOTFOUNDEXCEPTION"
ACCESS_DENIED = P + "ACCESSDENIEDEXCEPTION"
INSUFFICIENT_SCOPE = P + "INSUFFICIENTSCOPEEXCEPTION"
IDEMPOTENCY_KEY_REUSED = P + "IDEMPOTENCYKEYREUSEDEXCEPTION"
INVALID_IDEMPOTENCY_KEY = P + "INVALIDIDEMPOTENCYKEYEXCEPTION"
METHOD_NOT_FOUND = P + "METHODNOTFOUNDEXCEPTION"

# code -> (HTTP status, message). Messages are English stand-ins: real ones
# come in the portal's language, so clients must not match on them.
V3_ERRORS: dict[str, tuple[int, str]] = {
    REQUEST_VALIDATION: (400, "Error validating the request object"),
    DTO_VALIDATION: (400, "Validation error"),
    REQUEST_FILTER_VALIDATION: (400, "Error validating the request filter"),
    INVALID_JSON: (400, "Invalid JSON"),
    UNKNOWN_DTO_PROPERTY: (400, "Unknown DTO property"),
    UNKNOWN_FILTER_OPERATOR: (400, "Unknown filter operator"),
    INVALID_FILTER: (400, "Invalid filter"),
    INVALID_PAGINATION: (400, "Invalid pagination"),
    INVALID_ORDER: (400, "Invalid order"),
    INVALID_SELECT: (400, "Invalid select"),  # [UNCONFIRMED] status
    ENTITY_NOT_FOUND: (400, "Entity not found"),
    ACCESS_DENIED: (403, "Access denied"),
    INSUFFICIENT_SCOPE: (403, "Insufficient scope"),
    IDEMPOTENCY_KEY_REUSED: (422, "Idempotency key was already used with a different request"),
    INVALID_IDEMPOTENCY_KEY: (400, "Invalid idempotency key"),
    METHOD_NOT_FOUND: (404, "Method not found"),  # [UNCONFIRMED] status: guess 404
}


class V3Error(Exception):
    def __init__(
        self,
        code: str,
        validation: list[dict] | None = None,
        message: str | None = None,
        status: int | None = None,
    ):
        default_status, default_message = V3_ERRORS.get(code, (400, code))
        self.code = code
        self.status = default_status if status is None else status
        self.message = default_message if message is None else message
        self.validation = validation
        super().__init__(f"{code}: {self.message}")

    def payload(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.validation is not None:
            error["validation"] = self.validation
        return {"error": error}


def v(message: str, field: str | None = None) -> dict:
    """One ``validation[]`` entry; entries without ``field`` exist (§5.3 delete)."""
    return {"field": field, "message": message} if field is not None else {"message": message}


def _unknown_property(name: str, where: str) -> V3Error:
    message = f"Unknown field `{name}` for entity `ResultDto`"
    return V3Error(UNKNOWN_DTO_PROPERTY, [v(message, where)], message=message)


# ---- result item

ITEM_FIELDS = [
    "id",
    "taskId",
    "text",
    "authorId",
    "author",
    "createdAt",
    "updatedAt",
    "status",
    "fileIds",
    "rights",
    "messageId",
]
DEFAULT_SELECT = [f for f in ITEM_FIELDS if f != "author"]
# Field name -> ResultItem attribute, for filter and order.
FILTERABLE = {
    "taskId": "task_id",
    "id": "id",
    "authorId": "author_id",
    "status": "status",
    "messageId": "message_id",
}
ORDERABLE = {
    "id": "id",
    "authorId": "author_id",
    "createdAt": "created_at",
    "updatedAt": "updated_at",
    "status": "status",
    "messageId": "message_id",
}


def item_dict(portal, item: ResultItem, user_id: int | None, select=None) -> dict:
    full = {
        "id": item.id,
        "taskId": item.task_id,
        "text": item.text,
        "authorId": item.author_id,
        "createdAt": portal.iso(item.created_at),
        "updatedAt": portal.iso(item.updated_at) if item.updated_at is not None else None,
        "status": item.status,
        "fileIds": list(item.file_ids),
        "rights": portal.result_rights(item, user_id),
        "messageId": item.message_id,
    }
    if user_id is None:
        full.pop("rights")
    if select is None:
        return full
    out = {}
    for name in select:
        if name == "author":
            # [UNCONFIRMED] shape of the related author object.
            author = portal.users.get(item.author_id)
            out["author"] = {"id": item.author_id, "name": author.full_name if author else ""}
        else:
            out[name] = full.get(name)
    return out


# ---- shared validation


def _fields_object(body: dict, errors: list) -> dict | None:
    fields = body.get("fields", MISSING)
    if fields is MISSING or fields is None:
        errors.append(v("Required field `fields` is missing", "fields"))
        return None
    if fields == []:  # PHP: an empty JSON array and an empty object are the same
        return {}
    if not isinstance(fields, dict):
        errors.append(v("Field `fields` requires `array`", "fields"))  # [UNCONFIRMED] message
        return None
    return fields


def _check_known(fields: dict, allowed: set[str]) -> None:
    for name in fields:
        if name not in allowed:
            raise _unknown_property(name, "fields")


def _id_or_filter(body: dict, errors: list, method: str) -> int | None:
    """The id/filter rule of the generic update/delete DTO (§5.3).

    Neither given: both messages, without ``field`` (the reference's delete
    example). [UNCONFIRMED] that update answers the same way; the reference
    lists the same two rows for it. Both given: only the "only one" message.
    ``"id": null`` or a filter alone (a filter is not documented for these
    methods): "Required field `id` is not specified" [UNCONFIRMED for update]."""
    if method == "delete":
        at_least = "At least one required field must be filled: id, filter"
        only_one = "Only one of the values must be provided: id, filter"
    else:
        at_least = "At least one required field is not filled: `id`, `filter`"
        only_one = "Only one of the values must be provided: `id`, `filter`"
    has_id_key = "id" in body
    id_value = body.get("id")
    has_filter = body.get("filter") not in (None, MISSING)
    if id_value is not None and has_filter:
        errors.append(v(only_one))
        return None
    if id_value is None and not has_filter and not has_id_key:
        errors.append(v(at_least))
        errors.append(v(only_one))
        return None
    if id_value is None:
        errors.append(v("Required field `id` is not specified", "id"))
        return None
    if not is_int(id_value):
        errors.append(v("Field `id` requires `int`", "id"))  # [UNCONFIRMED] message
        return None
    return id_value


def _own_result(portal, ctx: AuthContext, result_id: int) -> ResultItem:
    item = portal.results_by_id.get(result_id)
    # [UNCONFIRMED] a missing id: by analogy with tasks.task.update v3 ("no access
    # or does not exist") the emulator answers 403 ACCESSDENIEDEXCEPTION.
    if item is None:
        raise V3Error(ACCESS_DENIED)
    task = portal.tasks.get(item.task_id)
    if task is None or not portal.can_access_task(ctx.user, task):
        raise V3Error(ACCESS_DENIED)
    # Author-only rule (§5.3). [UNCONFIRMED] whether admins may edit others'
    # results: the emulator says no, and ``rights`` says the same.
    if item.author_id != ctx.user.id:
        raise V3Error(ACCESS_DENIED)
    return item


def _text_errors(fields: dict, req_errors: list, dto_errors: list) -> None:
    text = fields.get("text", MISSING)
    if text is not MISSING and text is not None and not isinstance(text, str):
        req_errors.append(v("Field `text` requires `string`", "text"))  # [UNCONFIRMED] message
    # [UNCONFIRMED] an empty string counts as "not filled" (emulator guess).
    elif text is MISSING or text is None or text == "":
        dto_errors.append(v('The required field "text" is not filled', "text"))


def _file_ids_error(fields: dict, dto_errors: list) -> None:
    if "fileIds" in fields:
        dto_errors.append(v('The field "fileIds" is not available for filling', "fileIds"))


# ---- methods


def m_add(portal, ctx: AuthContext, body: dict):
    req_errors: list = []
    fields = _fields_object(body, req_errors)
    if fields is None:
        raise V3Error(REQUEST_VALIDATION, req_errors)
    _check_known(fields, {"taskId", "text", "fileIds"})
    dto_errors: list = []
    task_id = fields.get("taskId", MISSING)
    if task_id is MISSING:
        dto_errors.append(v('The required field "taskId" is not filled', "taskId"))
    elif task_id is None:
        # [UNCONFIRMED] which input gives "Task id must be set": the emulator uses null.
        req_errors.append(v("Task id must be set", "taskId"))
    elif not is_int(task_id):
        # [UNCONFIRMED] numeric strings are refused too (strict int).
        req_errors.append(v("Field `taskId` requires `int`", "taskId"))
    elif task_id <= 0:
        req_errors.append(v("Task id must be positive", "taskId"))
    _text_errors(fields, req_errors, dto_errors)
    _file_ids_error(fields, dto_errors)
    if req_errors:
        raise V3Error(REQUEST_VALIDATION, req_errors)
    if dto_errors:
        raise V3Error(DTO_VALIDATION, dto_errors)
    task = portal.tasks.get(task_id)
    if task is None:
        raise V3Error(REQUEST_VALIDATION, [v("Task not found", "taskId")])
    if not portal.can_access_task(ctx.user, task):
        raise V3Error(ACCESS_DENIED)
    item = portal.create_result(task.id, ctx.user.id, fields["text"])
    return {"item": item_dict(portal, item, ctx.user.id)}


def m_add_from_chat_message(portal, ctx: AuthContext, body: dict):
    req_errors: list = []
    fields = _fields_object(body, req_errors)
    if fields is None:
        raise V3Error(REQUEST_VALIDATION, req_errors)
    _check_known(fields, {"messageId", "fileIds"})
    dto_errors: list = []
    message_id = fields.get("messageId", MISSING)
    if message_id is MISSING or message_id is None:
        dto_errors.append(v('The required field "messageId" is not filled', "messageId"))
    elif not is_int(message_id):
        req_errors.append(v("Field `messageId` requires `int`", "messageId"))
    _file_ids_error(fields, dto_errors)
    if req_errors:
        raise V3Error(REQUEST_VALIDATION, req_errors)
    if dto_errors:
        raise V3Error(DTO_VALIDATION, dto_errors)
    message = portal.chat_messages.get(message_id)
    if message is None or message.task_id is None:
        raise V3Error(REQUEST_VALIDATION, [v("Message is not from task chat", "messageId")])
    task = portal.tasks.get(message.task_id)
    if task is None:
        raise V3Error(REQUEST_VALIDATION, [v("Task not found", "taskId")])
    if not portal.can_access_task(ctx.user, task):
        raise V3Error(ACCESS_DENIED)
    # [UNCONFIRMED] the author of a result made from a message: the emulator uses
    # the caller; creating two results from one message is allowed.
    item = portal.create_result(task.id, ctx.user.id, message.text, message_id=message.id)
    return {"item": item_dict(portal, item, ctx.user.id)}


def m_update(portal, ctx: AuthContext, body: dict):
    req_errors: list = []
    result_id = _id_or_filter(body, req_errors, "update")
    fields = _fields_object(body, req_errors)
    if req_errors:
        raise V3Error(REQUEST_VALIDATION, req_errors)
    # Only `text` may be changed: taskId, status, anything else -> unknown property.
    _check_known(fields, {"text", "fileIds"})
    dto_errors: list = []
    _text_errors(fields, req_errors, dto_errors)
    _file_ids_error(fields, dto_errors)
    if req_errors:
        raise V3Error(REQUEST_VALIDATION, req_errors)
    if dto_errors:
        raise V3Error(DTO_VALIDATION, dto_errors)
    item = _own_result(portal, ctx, result_id)
    item.text = fields["text"]
    item.updated_at = portal.fake.now()
    return {"item": item_dict(portal, item, ctx.user.id)}


def m_delete(portal, ctx: AuthContext, body: dict):
    req_errors: list = []
    result_id = _id_or_filter(body, req_errors, "delete")
    if req_errors:
        raise V3Error(REQUEST_VALIDATION, req_errors)
    item = _own_result(portal, ctx, result_id)
    portal.delete_result(item.id)
    return {"result": True}


# ---- list


_OPERATORS = {"=", "!=", ">", ">=", "<", "<="}
_ALL_OPERATORS = _OPERATORS | {"in", "between"}


def _parse_condition(cond) -> tuple:
    """-> ("cond", field, op, value) or ("or"/"and", [conditions])."""
    if isinstance(cond, dict):
        logic = str(cond.get("logic", "and")).lower()
        conditions = cond.get("conditions")
        if logic not in ("and", "or") or not isinstance(conditions, list) or not conditions:
            raise V3Error(INVALID_FILTER, [v("Cannot parse filter", "filter")])
        return (logic, [_parse_condition(c) for c in conditions])
    if not isinstance(cond, list) or len(cond) not in (2, 3) or not isinstance(cond[0], str):
        raise V3Error(INVALID_FILTER, [v("Cannot parse filter", "filter")])
    if len(cond) == 2:
        field, value = cond
        op = "in" if isinstance(value, list) else "="
    else:
        field, op, value = cond
        if not isinstance(op, str) or op.lower() not in _ALL_OPERATORS:
            raise V3Error(UNKNOWN_FILTER_OPERATOR, [v(f"Unknown filter operator `{op}`", "filter")])
        op = op.lower()
    if field not in FILTERABLE:
        if field in ITEM_FIELDS:
            # [UNCONFIRMED] a known but non-filterable field: guess INVALIDFILTEREXCEPTION.
            raise V3Error(INVALID_FILTER, [v(f"Field `{field}` is not filterable", "filter")])
        raise _unknown_property(field, "filter")
    if op in ("in", "between"):
        if not isinstance(value, list) or not value or (op == "between" and len(value) != 2):
            raise V3Error(INVALID_FILTER, [v(f"Invalid value for operator `{op}`", "filter")])
        values = value
    else:
        values = [value]
    for item in values:
        if field == "status":
            if item not in ("open", "closed"):
                raise V3Error(
                    REQUEST_VALIDATION, [v("Field `status` requires `open` or `closed`", "status")]
                )
        elif field == "messageId" and item is None and op in ("=", "!="):
            pass
        elif not is_int(item):
            raise V3Error(REQUEST_VALIDATION, [v(f"Field `{field}` requires `int`", field)])
    return ("cond", field, op, value)


def _match(node, item: ResultItem) -> bool:
    kind = node[0]
    if kind == "and":
        return all(_match(n, item) for n in node[1])
    if kind == "or":
        return any(_match(n, item) for n in node[1])
    _, field, op, value = node
    actual = getattr(item, FILTERABLE[field])
    if op == "in":
        return actual in value
    if op == "between":
        return actual is not None and value[0] <= actual <= value[1]
    if op == "=":
        return actual == value
    if op == "!=":
        return actual != value
    if actual is None:
        return False
    return {">": actual > value, ">=": actual >= value, "<": actual < value, "<=": actual <= value}[
        op
    ]


def _parse_int(value, name: str) -> int:
    if is_int(value) and value >= 0:
        return value
    # [UNCONFIRMED] numeric strings are accepted (PHP is_numeric).
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise V3Error(
        INVALID_PAGINATION, [v(f"Field `{name}` must be a non-negative number", "pagination")]
    )


def m_list(portal, ctx: AuthContext, body: dict):
    flt = body.get("filter")
    if flt in (None, [], {}, ""):
        raise V3Error(REQUEST_VALIDATION, [v("The field value cannot be empty", "filter")])
    if not isinstance(flt, list):
        raise V3Error(INVALID_FILTER, [v("Cannot parse filter", "filter")])
    nodes = [_parse_condition(c) for c in flt]
    task_conditions = [n for n in nodes if n[0] == "cond" and n[1] == "taskId"]
    if not task_conditions:
        # [UNCONFIRMED] `field` value: the reference's table gives "filter.taskId".
        raise V3Error(
            REQUEST_FILTER_VALIDATION,
            [v("A filter on the required field `taskId` must be set", "filter.taskId")],
        )
    # Tasks named explicitly (= / in) must exist and be readable, else 403.
    # [UNCONFIRMED] a task that does not exist gives 403 as well (no read access).
    for _, _, op, value in task_conditions:
        named = [value] if op == "=" else value if op == "in" else []
        for task_id in named:
            task = portal.tasks.get(task_id)
            if task is None or not portal.can_access_task(ctx.user, task):
                raise V3Error(ACCESS_DENIED)

    order = body.get("order")
    order_keys: list[tuple[str, bool]] = []
    if order not in (None, [], {}):
        if not isinstance(order, dict):
            raise V3Error(INVALID_ORDER, [v("Cannot parse order", "order")])
        for name, direction in order.items():
            if name not in ORDERABLE:
                if name in ITEM_FIELDS:
                    # [UNCONFIRMED] known but not sortable (text, taskId, ...).
                    raise V3Error(INVALID_ORDER, [v(f"Field `{name}` is not sortable", "order")])
                raise _unknown_property(name, "order")
            if not isinstance(direction, str) or direction.upper() not in ("ASC", "DESC"):
                raise V3Error(INVALID_ORDER, [v("Order direction must be ASC or DESC", "order")])
            order_keys.append((ORDERABLE[name], direction.upper() == "DESC"))

    select = body.get("select")
    if select in (None, []):
        select = None  # [UNCONFIRMED] default fields: the full item without `author`
    elif not isinstance(select, list) or not all(isinstance(s, str) for s in select):
        raise V3Error(REQUEST_VALIDATION, [v("Field `select` requires `array`", "select")])
    else:
        for name in select:
            if name not in ITEM_FIELDS:
                # [UNCONFIRMED] the general page says unknown own fields are dropped;
                # the results page lists this error. Emulator: the method page.
                raise _unknown_property(name, "select")

    pagination = body.get("pagination") or {}
    if not isinstance(pagination, dict):
        raise V3Error(INVALID_PAGINATION, [v("Cannot parse pagination", "pagination")])
    # [UNCONFIRMED] defaults by analogy with tasks.task.list v3: limit 50, max 1000
    # (larger limits are clamped). An explicit offset wins over page.
    limit = _parse_int(pagination.get("limit", 50), "limit")
    if limit == 0:
        raise V3Error(INVALID_PAGINATION, [v("Field `limit` must be positive", "pagination")])
    limit = min(limit, 1000, portal.result_page_cap or 1000)
    if "offset" in pagination:
        offset = _parse_int(pagination["offset"], "offset")
    else:
        page = _parse_int(pagination.get("page", 1), "page")
        offset = (max(page, 1) - 1) * limit

    items = [
        r
        for r in portal.results_by_id.values()
        if all(_match(n, r) for n in nodes)
        and (task := portal.tasks.get(r.task_id)) is not None
        and portal.can_access_task(ctx.user, task)
    ]
    items.sort(key=lambda r: r.id)
    for attr, desc in reversed(order_keys):
        present = [r for r in items if getattr(r, attr) is not None]
        absent = [r for r in items if getattr(r, attr) is None]
        present.sort(key=lambda r: getattr(r, attr), reverse=desc)
        items = present + absent if not desc else absent + present
    page_items = items[offset : offset + limit]
    return {"items": [item_dict(portal, r, ctx.user.id, select) for r in page_items]}


METHODS = {
    "tasks.task.result.add": m_add,
    "tasks.task.result.update": m_update,
    "tasks.task.result.delete": m_delete,
    "tasks.task.result.list": m_list,
    "tasks.task.result.addfromchatmessage": m_add_from_chat_message,
}
WRITE_METHODS = {
    "tasks.task.result.add",
    "tasks.task.result.update",
    "tasks.task.result.delete",
    "tasks.task.result.addfromchatmessage",
}
# [UNCONFIRMED] `task` vs `tasks` (§5.2): the emulator accepts either.
TASK_SCOPES = {"task", "tasks"}


# ---- dispatch


def valid_idempotency_key(key: str) -> bool:
    return 1 <= len(key) <= 255 and all(0x20 <= ord(c) <= 0x7E for c in key)


def _fingerprint(body: dict, whole_body: bool = False) -> str:
    # [UNCONFIRMED] whether `auth` is part of "the same body": the token changes when a
    # client refreshes and retries. By default it is not; `portal.idempotency_whole_body`
    # makes a refreshed token a different body (422), as a portal comparing raw bodies would.
    return json.dumps(
        {k: val for k, val in body.items() if whole_body or k != "auth"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def handle(portal, req: Request, method: str, webhook, record: dict) -> Response:
    fake = portal.fake
    start = fake.now()
    method = method.lower()
    key = req.headers.get("Idempotency-Key")
    echo = [("Idempotency-Key", key)] if key is not None else []
    record["idempotency_key"] = key

    def v3_error(err: V3Error) -> Response:
        return Response.json(err.payload(), err.status, headers=echo)

    # [UNCONFIRMED] v3 "does not read parameters from the query string": `?auth=`
    # is ignored here, so a token only in the query gives 401 NO_AUTH_FOUND.
    if not req.body and req.method in ("GET", "HEAD"):
        body: dict = {}
    else:
        ctype = req.content_type
        try:
            if ctype and "json" not in ctype:
                raise ValueError("not JSON")
            body = json.loads(req.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return v3_error(V3Error(INVALID_JSON))
        if not isinstance(body, dict):
            return v3_error(V3Error(INVALID_JSON))
    record["body"] = body

    with fake.lock:
        try:
            ctx = authenticate(portal, None if webhook else body.get("auth"), webhook)
        except ClassicError as err:
            # Auth failures keep the classic shape on /rest/api/ too (§5.2 emulator choice).
            return err.response(headers=echo)
        fn = METHODS.get(method)
        if fn is None:
            return v3_error(V3Error(METHOD_NOT_FOUND, message=f"Method `{method}` not found"))
        if not (TASK_SCOPES & ctx.scopes):
            return v3_error(V3Error(INSUFFICIENT_SCOPE))

        idem_scope = None
        fingerprint = None
        if key is not None and method in WRITE_METHODS and not portal.idempotency_ignored:
            if not valid_idempotency_key(key):
                return v3_error(V3Error(INVALID_IDEMPOTENCY_KEY))
            idem_scope = (ctx.identity, ctx.user.id, method, key)
            fingerprint = _fingerprint(body, portal.idempotency_whole_body)
            stored = portal.idempotency.get(idem_scope)
            if stored is not None and stored.stored_at + IDEMPOTENCY_TTL_S <= fake.now():
                del portal.idempotency[idem_scope]
                stored = None
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    return v3_error(V3Error(IDEMPOTENCY_KEY_REUSED))
                record["replayed"] = True
                return Response.json(
                    stored.payload, stored.status, headers=[*echo, ("Idempotent-Replayed", "true")]
                )

        op_key = (ctx.identity, method)
        try:
            portal.check_operating(op_key)
        except ClassicError as err:
            return err.response(headers=echo)
        try:
            result = fn(portal, ctx, body)
        except V3Error as err:
            return v3_error(err)
        finally:
            portal.charge_operating(op_key, method)
        payload = {"result": result, "time": time_block(portal, start, fake.now(), op_key)}
        if idem_scope is not None:
            portal.idempotency[idem_scope] = IdempotencyRecord(
                fingerprint, 200, payload, fake.now()
            )
    return Response.json(payload, headers=echo)
