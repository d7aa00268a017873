"""The embedded results screen and its frame endpoints.

`POST /b24/app/` is where Bitrix24 opens the app (any placement). Everything after that is a
frame request carrying the signed frame token (header `X-Frame-Token` or field `frame_token`);
no cookie is needed or trusted. With JavaScript the page calls these endpoints with `fetch` and
swaps the returned list in place; without it the forms post and get the whole screen back.
"""

from __future__ import annotations

import functools
import json
import logging

from django.http import JsonResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.utils import translation
from django.utils.translation import gettext as _
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from b24app import metrics
from b24app.ids import parse_id
from b24app.languages import frame_language
from b24app.logs import claimed_id
from b24app.portals import frame
from b24app.portals.services import FrameRefused
from b24app.portals.site import app_url
from results import selectors, services
from results.http import busy, framed, refused, status_of, wants_json
from results.models import ResultChange
from results.services import Frame, Rebind

logger = logging.getLogger("results")

TASK_PLACEMENTS = {"TASK_VIEW_TAB", "TASK_VIEW_SIDEBAR", "TASK_VIEW_TOP_PANEL"}
MAX_OPTIONS_LENGTH = 10_000

# --- parsing what Bitrix24 posts ---------------------------------------------------------------


def _placement_options(raw: str) -> dict:
    """`PLACEMENT_OPTIONS` is a JSON string; anything but a (sane) object counts as empty."""
    if not raw or len(raw) > MAX_OPTIONS_LENGTH:
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _positive_int(value) -> int | None:
    """A Bitrix24 id: 1 to 18 ASCII digits (fits a 64-bit column), else None."""
    number = parse_id(str(value if value is not None else "").strip())
    return number if number else None


def _task_from_placement(placement: str, options: dict) -> int | None:
    if placement in TASK_PLACEMENTS:
        return _positive_int(options.get("taskId"))
    if placement == "TASK_LIST_CONTEXT_MENU":
        return _positive_int(options.get("ID"))
    return None


def frame_view(handler):
    """Frame endpoints: csrf-exempt (the frame token is the proof) and refusing cleanly."""

    @csrf_exempt
    @functools.wraps(handler)
    def wrapped(request, *args, **kwargs):
        try:
            fr = services.frame_resolve(frame.from_request(request))
        except FrameRefused as exc:
            translation.activate(frame_language(request.GET.get("lang", "")))
            return refused(request, exc.message, status_of(exc), code=exc.code, cause=exc)
        translation.activate(fr.language)
        return framed(handler(request, fr, *args, **kwargs), fr)

    return wrapped


# --- the screen --------------------------------------------------------------------------------


def _screen_context(fr: Frame, task_id: int | None, *, error=None, notice=None) -> dict:
    shown = (
        services.results_for_screen(account=fr.account, task_id=task_id)
        if task_id is not None
        else services.TaskResults()
    )
    results, cause = shown.items, shown.unavailable
    status = status_of(cause) if cause is not None else 200
    return {
        "frame_token": fr.token,
        "frame_field": frame.FIELD,
        "account": fr.account,
        "portal": fr.portal,
        "task_id": task_id,
        "results": results,
        "unavailable": cause.message if cause is not None else None,
        "error": error,
        "notice": notice,
        "status": status,
        "cause": cause,
        # No access or no such task: nothing to add to. Busy or down: keep the list usable.
        "hide_list": cause is not None and status < 500,
    }


def _render_screen(
    request, fr: Frame, task_id: int | None, *, error=None, notice=None, status=None, cause=None
):
    context = _screen_context(fr, task_id, error=error, notice=notice)
    cause = cause or context["cause"]
    if wants_json(request):
        html = render_to_string("results/_results.html", context, request=request)
        payload = {
            "html": html,
            "error": str(error or "") or None,
            "unavailable": str(context["unavailable"] or "") or None,
        }
        response = JsonResponse(payload, status=status or (400 if error else context["status"]))
        return busy(response, cause)
    if task_id is None and fr.account.is_admin:
        context["connection"] = selectors.portal_connection(fr.portal)
    response = render(request, "results/screen.html", context, status=status or context["status"])
    return busy(response, cause)


@csrf_exempt  # a cross-site form POST from the Bitrix24 frame, verified below instead
@require_POST
def screen(request):
    """Placement entry: verify the POST, learn who opened it, show the task's results."""
    language = frame_language(request.GET.get("LANG"))
    translation.activate(language)
    try:
        fr = services.frame_open(
            post=request.POST, domain=request.GET.get("DOMAIN") or None, language=language
        )
    except FrameRefused as exc:
        logger.warning(
            "placement refused error=%s member_id=%s",
            exc.code,
            claimed_id(request.POST.get("member_id", "")),
        )
        metrics.frame_refused(exc.reason, exc.code)
        return refused(request, exc.message, status_of(exc), code=exc.code, cause=exc)
    placement = str(request.POST.get("PLACEMENT", "DEFAULT"))[:64].upper()
    task_id = _task_from_placement(
        placement, _placement_options(request.POST.get("PLACEMENT_OPTIONS", ""))
    )
    return framed(_render_screen(request, fr, task_id), fr)


@frame_view
@require_http_methods(["GET", "POST"])
def task_results(request, fr: Frame):
    """The results of a task: the DEFAULT placement's picker and the page's own refresh."""
    task_id = _positive_int(request.POST.get("task") or request.GET.get("task"))
    if task_id is None:
        return _render_screen(request, fr, None, error=_("Enter a task number."), status=400)
    return _render_screen(request, fr, task_id)


# --- changes -----------------------------------------------------------------------------------


def _submit(request, fr: Frame, *, action: str, result_id: int | None = None):
    if result_id is not None and _positive_int(result_id) is None:
        return _render_screen(request, fr, None, error=_("Unknown result."), status=404)
    task_id = _positive_int(request.POST.get("task"))
    if task_id is None:
        return _render_screen(request, fr, None, error=_("Choose a task first."), status=400)
    try:
        change = services.result_change_submit(
            account=fr.account,
            task_id=task_id,
            action=action,
            result_id=result_id,
            text=request.POST.get("text", ""),
            text_before=request.POST.get("text_before", ""),
        )
    except services.ResultError as exc:
        return _change_refused(request, fr, exc, task_id)
    return _change_accepted(request, fr, change)


def _change_refused(request, fr: Frame, exc: services.ResultError, task_id: int | None):
    """The answer to a change the app did not take: nothing was stored or sent."""
    status = status_of(exc)
    if wants_json(request):
        return JsonResponse({"error": str(exc.message)}, status=status)
    return _render_screen(request, fr, task_id, error=exc.message, status=status)


def _change_accepted(request, fr: Frame, change: ResultChange):
    """The answer to a change the app took: 200 whatever Bitrix24 said (the change is kept and
    its state shown). The screen's script gets only what changed, to lay over the list the
    person has: it never depends on reading the list again, which a busy portal may refuse.
    Without JavaScript the whole screen is shown, with the list if it can be read."""
    if not wants_json(request):
        return _render_screen(request, fr, change.task_id, notice=_notice(change), status=200)
    payload = {"change": _change_state(request, fr, change), "notice": str(_notice(change))}
    if change.action == ResultChange.Action.ADD:
        item = services.result_item_of_change(change=change)
        payload["item_html"] = render_to_string(
            "results/_item.html", {**_frame_fields(fr), "item": item}, request=request
        )
    elif change.action == ResultChange.Action.UPDATE:
        payload["text"] = change.text_after
    return JsonResponse(payload)


def _notice(change: ResultChange) -> str:
    if change.state == ResultChange.State.SAVED:
        return _("Saved")
    if change.state == ResultChange.State.QUEUED:
        return _("Queued")
    return _("Not saved")


def _frame_fields(fr: Frame) -> dict:
    """What the list's fragments need to carry the frame session in their forms (Retry)."""
    return {"frame_token": fr.token, "frame_field": frame.FIELD}


def _change_state(request, fr: Frame, change: ResultChange) -> dict:
    """A change as the screen shows it: its state, and the badge to swap in for it."""
    return {
        "id": change.pk,
        "state": change.state,
        "label": str(change.get_state_display()),
        "action": change.action,
        "result_id": change.result_id,
        "html": render_to_string(
            "results/_change.html", {**_frame_fields(fr), "change": change}, request=request
        ),
    }


@frame_view
@require_POST
def result_add(request, fr: Frame):
    return _submit(request, fr, action=ResultChange.Action.ADD)


@frame_view
@require_POST
def result_edit(request, fr: Frame, result_id: int):
    return _submit(request, fr, action=ResultChange.Action.UPDATE, result_id=result_id)


@frame_view
@require_POST
def result_delete(request, fr: Frame, result_id: int):
    return _submit(request, fr, action=ResultChange.Action.DELETE, result_id=result_id)


@frame_view
@require_POST
def change_retry(request, fr: Frame, change_id: int):
    try:
        change = services.result_change_resend(change_id=change_id, account=fr.account)
    except services.ResultError as exc:
        return _change_refused(request, fr, exc, exc.task_id)
    return _change_accepted(request, fr, change)


@frame_view
@require_GET
def changes_state(request, fr: Frame):
    """The states of the page's queued changes, for its polling, each with the badge to show."""
    parts = request.GET.get("ids", "").split(",")[:200]
    ids = [number for part in parts if (number := _positive_int(part)) is not None]
    changes = services.result_changes_poll(account=fr.account, ids=ids)
    return JsonResponse({"changes": [_change_state(request, fr, change) for change in changes]})


# --- the frame session and the connection --------------------------------------------------------


@csrf_exempt  # the expired frame token plus fresh Bitrix24 auth is the proof
@require_POST
def session_renew(request):
    """Trade fresh frame auth (BX24 `refreshAuth`) for a new frame token of the same account."""
    try:
        fr = services.frame_renew(
            token=frame.from_request(request),
            access_token=request.POST.get("AUTH_ID", ""),
            refresh_token=request.POST.get("REFRESH_ID", ""),
            expires_in=request.POST.get("AUTH_EXPIRES", ""),
        )
    except frame.FrameTokenError:
        return framed(JsonResponse({"error": "frame_invalid"}, status=403), None)
    except FrameRefused as exc:
        return busy(framed(JsonResponse({"error": exc.code}, status=status_of(exc)), None), exc)
    return framed(JsonResponse({"token": fr.token}), None)


def _rebind_error(done: services.RebindOutcome) -> str:
    if done.outcome == Rebind.NOT_ADMIN:
        return _("Only a Bitrix24 administrator can do this.")
    if done.outcome == Rebind.BUSY:
        return _("Bitrix24 is busy right now. Try again in a minute.")
    if done.outcome == Rebind.MISSING:
        return _("Bitrix24 did not bind everything: %(detail)s") % {
            "detail": done.portal.bindings_detail
        }
    return _("Bitrix24 did not answer; try again later.")


@frame_view
@require_POST
def rebind(request, fr: Frame):
    """A portal admin checks the app's bindings and binds again what is missing (the DEFAULT
    placement's connection panel)."""
    done = services.portal_rebind(fr=fr, app_url=app_url(request))
    if done.outcome == Rebind.BOUND:
        return _render_screen(
            request, fr, None, notice=_("The Results tab and the app's events are bound.")
        )
    return _render_screen(
        request,
        fr,
        None,
        error=_rebind_error(done),
        status=status_of(done.outcome),
        cause=done.cause,
    )
