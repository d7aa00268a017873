"""The Bitrix24 methods the app calls, and the JSON shapes of their answers, in one place.

Each function sends one method through a :class:`~b24app.portals.bitrix.client.BitrixClient`
(anything with its ``call``/``call_v3``/``list_v3``) and reads the answer into a small typed
value. A portal may answer anything: wrong types and missing keys never end in a ``TypeError``
or ``KeyError``. An answer that cannot be read at all raises :class:`BitrixInvalidResponse`
(code ``INVALID_RESPONSE``, a :class:`BitrixError`); a field that cannot be read is ``None``
(or ``""``/``False``, as each field says). Transport and Bitrix24 errors pass through as raised
by the client.

The ``*_parse`` functions read an answer already fetched (by a caller, or by
:meth:`OAuthServer.app_info <b24app.portals.bitrix.oauth.OAuthServer.app_info>`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from b24app.ids import parse_id
from b24app.portals.bitrix.errors import BitrixInvalidResponse

if TYPE_CHECKING:
    from b24app.portals.bitrix.client import BitrixClient

__all__ = [
    "RESULT_FIELDS",
    "AppInfo",
    "Binding",
    "Profile",
    "TaskResult",
    "TaskResults",
    "TrustedAppInfo",
    "app_info_get",
    "app_info_parse",
    "event_bind",
    "event_unbind",
    "events_list",
    "placement_bind",
    "placement_unbind",
    "placements_list",
    "profile_get",
    "profile_parse",
    "task_result_add",
    "task_result_delete",
    "task_result_parse",
    "task_result_update",
    "task_results_list",
    "task_results_page",
    "trusted_app_info_parse",
]

RESULT_LIST = "tasks.task.result.list"
RESULT_FIELDS = (
    "id",
    "taskId",
    "text",
    "authorId",
    "author",
    "createdAt",
    "updatedAt",
    "status",
    "rights",
)
"""Every field of a task result the app reads (``select`` of ``tasks.task.result.list``)."""


def _invalid(method: str, what: str) -> BitrixInvalidResponse:
    return BitrixInvalidResponse("INVALID_RESPONSE", f"{method} returned {what}")


def _object(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    """A string field: the string, or ``""`` for anything else (a number, a list, ``null``)."""
    return value if isinstance(value, str) else ""


def _parse_time(value: Any) -> datetime | None:
    """An ISO 8601 moment (aware; UTC when it names no zone), or ``None``."""
    if not value or not isinstance(value, str | int | float):
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- profile ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """``profile``: who the access token belongs to."""

    id: int | None
    """``ID``; ``None`` when the portal named no valid id (an inactive user gets ``{}``)."""
    name: str
    """``NAME`` and ``LAST_NAME``, space-separated; the parts that are non-empty strings."""
    admin: bool
    """``ADMIN`` is JSON ``true``; anything else (``"Y"``, ``1``, missing) is not an admin."""


def profile_parse(result: Any) -> Profile:
    """Read a ``profile`` result; raises :class:`BitrixInvalidResponse` unless it is an object."""
    if not isinstance(result, dict):
        raise _invalid("profile", "no object")
    name = " ".join(
        part
        for part in (result.get("NAME"), result.get("LAST_NAME"))
        if isinstance(part, str) and part
    )
    return Profile(id=parse_id(result.get("ID")), name=name, admin=result.get("ADMIN") is True)


def profile_get(client: BitrixClient) -> Profile:
    """``profile`` (classic REST, any scope)."""
    return profile_parse(client.call("profile"))


# --- app.info -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppInfo:
    """Classic REST ``app.info`` on the portal (an application token's view of the install)."""

    status: str
    """``STATUS`` (``F`` free, ``D`` demo, ``T`` trial, ``P`` paid, …); ``""`` when missing."""
    installed: bool
    """``INSTALLED`` is JSON ``true``."""


def app_info_parse(result: Any) -> AppInfo:
    """Read a classic ``app.info`` result; raises :class:`BitrixInvalidResponse` unless it is an
    object."""
    if not isinstance(result, dict):
        raise _invalid("app.info", "no object")
    return AppInfo(status=_text(result.get("STATUS")), installed=result.get("INSTALLED") is True)


def app_info_get(client: BitrixClient) -> AppInfo:
    """``app.info`` (classic REST on the portal)."""
    return app_info_parse(client.call("app.info"))


@dataclass(frozen=True)
class TrustedAppInfo:
    """``app.info`` on the OAuth server (§2.7): what Bitrix24 itself vouches for about a token.

    Text fields are ``""`` when missing; numbers and other scalars are read as their text.
    """

    client_id: str
    member_id: str
    """``install.member_id``."""
    domain: str
    """``install.domain``, lower-case."""
    client_endpoint: str
    """``install.client_endpoint``."""
    installed: bool
    """``install.installed`` is true (any truthy JSON value, as the OAuth server is trusted)."""
    status: str
    """``install.status``."""
    scope: str
    """``scope``, else ``install.scope``."""
    user_id: int | None
    """``user_id``: whose token it is; ``None`` when not a valid id."""

    def vouches_for(self, *, client_id: str, member_id: str) -> bool:
        """This app (``client_id``), installed on the portal ``member_id``."""
        return self.client_id == client_id and self.member_id == member_id and self.installed


def _scalar_text(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    return str(value)


def trusted_app_info_parse(info: Any) -> TrustedAppInfo:
    """Read what :meth:`OAuthServer.app_info` returned (already checked to be an object)."""
    info = _object(info)
    install = _object(info.get("install"))
    return TrustedAppInfo(
        client_id=_scalar_text(info.get("client_id")),
        member_id=_scalar_text(install.get("member_id")),
        domain=_scalar_text(install.get("domain")).lower(),
        client_endpoint=_scalar_text(install.get("client_endpoint")),
        installed=bool(install.get("installed")),
        status=_scalar_text(install.get("status")),
        scope=_scalar_text(info.get("scope") or install.get("scope")),
        user_id=parse_id(info.get("user_id")),
    )


# --- placements and event handlers --------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """One registration a portal lists: a placement (``placement.get``) or an event handler
    (``event.get``)."""

    name: str
    """Upper-case placement code (``TASK_VIEW_TAB``) or event name (``ONAPPUPDATE``)."""
    handler: str
    """The handler URL as the portal has it."""


def _bindings(result: Any, key: str) -> list[Binding]:
    """A list answer; anything but a list (``null``, ``""``, an object) lists nothing, and
    entries that are not objects are skipped."""
    entries = result if isinstance(result, list) else []
    return [
        Binding(str(entry.get(key, "")).upper(), str(entry.get("handler", "")))
        for entry in entries
        if isinstance(entry, dict)
    ]


def placements_list(client: BitrixClient) -> list[Binding]:
    """``placement.get``: the app's placements (needs a portal admin's token)."""
    return _bindings(client.call("placement.get"), "placement")


def events_list(client: BitrixClient) -> list[Binding]:
    """``event.get``: the app's event handlers (a non-admin sees only their own)."""
    return _bindings(client.call("event.get"), "event")


def placement_bind(
    client: BitrixClient, placement: str, handler: str, titles: Mapping[str, str]
) -> None:
    """``placement.bind`` with a title per language (``titles``: language → title; the
    ``en`` one, else the first, is the default ``TITLE``)."""
    default = titles.get("en") or next(iter(titles.values()), "")
    client.call(
        "placement.bind",
        {
            "PLACEMENT": placement,
            "HANDLER": handler,
            "TITLE": default,
            "LANG_ALL": {lang: {"TITLE": title} for lang, title in titles.items()},
        },
    )


def placement_unbind(client: BitrixClient, placement: str, handler: str) -> int | None:
    """``placement.unbind``; the ``count`` the portal answers (``None`` when it names none)."""
    result = client.call("placement.unbind", {"PLACEMENT": placement, "HANDLER": handler})
    return parse_id(_object(result).get("count"))


def event_bind(client: BitrixClient, event: str, handler: str) -> None:
    """``event.bind`` of an online event handler."""
    client.call("event.bind", {"event": event, "handler": handler})


def event_unbind(client: BitrixClient, event: str, handler: str) -> int | None:
    """``event.unbind``; the ``count`` the portal answers (``None`` when it names none)."""
    result = client.call("event.unbind", {"event": event, "handler": handler})
    return parse_id(_object(result).get("count"))


# --- task results (REST 3.0) --------------------------------------------------------------------


@dataclass(frozen=True)
class TaskResult:
    """One item of ``tasks.task.result.*`` (REST 3.0), as far as the answer says."""

    id: int
    task_id: int | None
    text: str | None
    """``text``; ``None`` when the item has none (not selected, or ``null``)."""
    author_id: int
    """``authorId``; 0 when missing or not a valid id."""
    author_name: str
    """``author.name``; ``""`` when not given (``author`` is only sent when selected)."""
    created_at: datetime | None
    updated_at: datetime | None
    closed: bool
    """``status`` is ``"closed"``."""
    can_edit: bool
    """``rights.edit`` is JSON ``true``."""
    can_remove: bool
    """``rights.remove`` is JSON ``true``."""


def task_result_parse(item: Any) -> TaskResult | None:
    """Read one result item; ``None`` when it is not an object with a valid ``id``."""
    if not isinstance(item, dict):
        return None
    result_id = parse_id(item.get("id"))
    if result_id is None:
        return None
    rights = _object(item.get("rights"))
    text = item.get("text")
    return TaskResult(
        id=result_id,
        task_id=parse_id(item.get("taskId")),
        text=None if text is None or isinstance(text, dict | list) else str(text),
        author_id=parse_id(item.get("authorId")) or 0,
        author_name=_scalar_text(_object(item.get("author")).get("name")),
        created_at=_parse_time(item.get("createdAt")),
        updated_at=_parse_time(item.get("updatedAt")),
        closed=str(item.get("status")) == "closed",
        can_edit=rights.get("edit") is True,
        can_remove=rights.get("remove") is True,
    )


@dataclass(frozen=True)
class TaskResults:
    """What a ``tasks.task.result.list`` listing returned."""

    items: list[TaskResult]
    """The items that could be read, in the portal's order."""
    unreadable: int
    """Items skipped because they could not be read (no object, no valid ``id``)."""
    largest_page: int
    """See :attr:`~b24app.portals.bitrix.client.V3Listing.largest_page`."""


def _result_filter(task_id: int, result_id: int | None, author_id: int | None) -> list[list[Any]]:
    conditions: list[list[Any]] = [["taskId", task_id]]
    if result_id is not None:
        conditions.append(["id", result_id])
    if author_id is not None:
        conditions.append(["authorId", author_id])
    return conditions


def task_results_list(
    client: BitrixClient,
    task_id: int,
    *,
    result_id: int | None = None,
    author_id: int | None = None,
    select: Iterable[str] = RESULT_FIELDS,
    order: Mapping[str, str] | None = None,
    page_size: int = 50,
    known_page: int = 0,
) -> TaskResults:
    """All results of a task (optionally one result, or one author's), every page
    (:meth:`BitrixClient.list_v3`). ``order`` such as ``{"id": "DESC"}``."""
    params: dict[str, Any] = {
        "filter": _result_filter(task_id, result_id, author_id),
        "select": list(select),
    }
    if order is not None:
        params["order"] = dict(order)
    listing = client.list_v3(RESULT_LIST, params, page_size=page_size, known_page=known_page)
    parsed = [task_result_parse(item) for item in listing.items]
    items = [item for item in parsed if item is not None]
    return TaskResults(
        items=items, unreadable=len(parsed) - len(items), largest_page=listing.largest_page
    )


def task_results_page(
    client: BitrixClient,
    task_id: int,
    *,
    limit: int,
    offset: int = 0,
    select: Sequence[str] = ("id",),
    order: Mapping[str, str] | None = None,
) -> list[Any]:
    """One page of ``tasks.task.result.list`` as the portal sent it (its raw items), for
    measuring how a portal pages; raises :class:`BitrixInvalidResponse` without an items list."""
    params: dict[str, Any] = {
        "filter": _result_filter(task_id, None, None),
        "select": list(select),
        "pagination": {"limit": limit, "offset": offset},
    }
    if order is not None:
        params["order"] = dict(order)
    items = _object(client.call_v3(RESULT_LIST, params)).get("items")
    if not isinstance(items, list):
        raise _invalid(RESULT_LIST, "no items list")
    return items


def _answer_item(result: Any) -> TaskResult | None:
    return task_result_parse(_object(result).get("item"))


def task_result_add(
    client: BitrixClient, task_id: int, text: str, *, idempotency_key: str | None = None
) -> TaskResult | None:
    """``tasks.task.result.add``; the item the portal answers, ``None`` when it names no
    readable one (the add was accepted all the same)."""
    result = client.call_v3(
        "tasks.task.result.add",
        {"fields": {"taskId": task_id, "text": text}},
        idempotency_key=idempotency_key,
    )
    return _answer_item(result)


def task_result_update(
    client: BitrixClient, result_id: int, text: str, *, idempotency_key: str | None = None
) -> TaskResult | None:
    """``tasks.task.result.update`` of the text; the item the portal answers, if readable."""
    result = client.call_v3(
        "tasks.task.result.update",
        {"id": result_id, "fields": {"text": text}},
        idempotency_key=idempotency_key,
    )
    return _answer_item(result)


def task_result_delete(
    client: BitrixClient, result_id: int, *, idempotency_key: str | None = None
) -> None:
    """``tasks.task.result.delete``."""
    client.call_v3("tasks.task.result.delete", {"id": result_id}, idempotency_key=idempotency_key)
