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
from dataclasses import dataclass

from django.http import JsonResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.utils import translation
from django.utils.translation import gettext as _
from django.utils.translation import pgettext
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from b24app.framing import allow_portal_framing, claimed_portal_origin
from b24app.ids import parse_id
from b24app.languages import frame_language
from b24app.logs import claimed_id
from b24app.portals import frame
from b24app.portals.bitrix import BitrixError, BitrixUnavailable
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S, busy_retry_after_s
from b24app.portals.selectors import portal_last_refreshed_at
from b24app.portals.services import (
    FrameRefused,
    frame_account_open,
    frame_session_renew,
    portal_bindings_check,
)
from b24app.portals.views import app_url
from results import selectors, services
from results.models import ResultChange

logger = logging.getLogger("results")

TASK_PLACEMENTS = {"TASK_VIEW_TAB", "TASK_VIEW_SIDEBAR", "TASK_VIEW_TOP_PANEL"}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'"
)


MAX_OPTIONS_LENGTH = 10_000


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


@dataclass
class Frame:
    """A verified frame request: who, where, in which language."""

    account: Account
    token: str
    language: str

    @property
    def portal(self):
        return self.account.portal


def _framed(response, fr: Frame | None):
    response["Content-Security-Policy"] = CSP
    response["Cache-Control"] = "no-store"
    response["Referrer-Policy"] = "no-referrer"
    if fr is not None:
        allow_portal_framing(response, fr.portal.origin)
    return response


def _refused(
    request,
    message,
    status: int,
    fr: Frame | None = None,
    *,
    code: str = "refused",
    cause: BaseException | None = None,
):
    if _wants_json(request):
        response = JsonResponse({"error": code, "message": str(message)}, status=status)
        return _busy(_framed(response, fr), cause)
    response = _framed(
        render(request, "results/refused.html", {"message": message}, status=status), fr
    )
    claimed = claimed_portal_origin(request)
    if fr is None and claimed:
        allow_portal_framing(response, claimed)
    return _busy(response, cause)


def _busy(response, cause: BaseException | None = None):
    """A 503 says when to try again (`Retry-After`): when the portal's request budget has a
    slot, as far as the limiter or Bitrix24 said, else a few seconds. A web request waits at
    most `WEB_LIMITER_WAIT_S` for a slot and answers this instead of holding a thread."""
    if response.status_code == 503:
        response["Retry-After"] = str(busy_retry_after_s(cause))
    return response


def _wants_json(request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _frame(request) -> Frame:
    """The frame session a request carries; raises `FrameRefused` otherwise."""
    token = frame.from_request(request)
    try:
        session = frame.read(token)
    except frame.FrameExpired as exc:
        raise FrameRefused(
            _("Your session in this window has expired. Reopen the app."),
            status=401,
            code="frame_expired",
        ) from exc
    except frame.FrameTokenError as exc:
        raise FrameRefused(
            _("This page must be opened from Bitrix24."), code="frame_invalid"
        ) from exc
    account = (
        Account.objects.select_related("portal")
        .filter(pk=session.account_id, portal_id=session.portal_id)
        .first()
    )
    if account is None or not account.has_tokens:
        raise FrameRefused(_("This session is no longer valid. Reopen the app."), code="frame_gone")
    if account.state == Account.State.WAITING:
        # The account's tokens were lost in transit: like an expired session, the open screen
        # renews it with fresh auth from the Bitrix24 frame (refreshAuth) and repeats the request.
        raise FrameRefused(
            _("Your session in this window has expired. Reopen the app."),
            status=401,
            code="frame_expired",
        )
    if account.portal.state == Portal.State.UNINSTALLED or account.portal.blocked_by_operator:
        raise FrameRefused(_("The app is not available on this Bitrix24."), code="portal_off")
    translation.activate(session.language)
    return Frame(account=account, token=token, language=session.language)


def frame_view(handler):
    """Frame endpoints: csrf-exempt (the frame token is the proof) and refusing cleanly."""

    @csrf_exempt
    @functools.wraps(handler)
    def wrapped(request, *args, **kwargs):
        try:
            fr = _frame(request)
        except FrameRefused as exc:
            translation.activate(frame_language(request.GET.get("lang", "")))
            return _refused(request, exc.message, exc.status, code=exc.code, cause=exc)
        return _framed(handler(request, fr, *args, **kwargs), fr)

    return wrapped


# --- the screen --------------------------------------------------------------------------------


def _screen_context(fr: Frame, task_id: int | None, *, error=None, notice=None) -> dict:
    results, unavailable, status, cause = [], None, 200, None
    if task_id is not None:
        try:
            results = services.results_fetch(account=fr.account, task_id=task_id)
        except services.ScreenUnavailable as exc:
            unavailable, status, cause = exc.message, exc.status, exc
            if status >= 500:  # busy or down: keep what the person did in sight
                results = services.results_pending_only(account=fr.account, task_id=task_id)
    return {
        "frame_token": fr.token,
        "frame_field": frame.FIELD,
        "account": fr.account,
        "portal": fr.portal,
        "task_id": task_id,
        "results": results,
        "unavailable": unavailable,
        "error": error,
        "notice": notice,
        "status": status,
        "cause": cause,
        "language": fr.language,
        "pending_ids": [
            item.change.pk
            for item in results
            if item.change and item.change.state == ResultChange.State.QUEUED
        ],
        # No access or no such task: nothing to add to. Busy or down: keep the list usable.
        "hide_list": unavailable is not None and status < 500,
    }


def _render_screen(
    request, fr: Frame, task_id: int | None, *, error=None, notice=None, status=None, cause=None
):
    context = _screen_context(fr, task_id, error=error, notice=notice)
    cause = cause or context["cause"]
    if _wants_json(request):
        html = render_to_string("results/_results.html", context, request=request)
        payload = {
            "html": html,
            "pending": context["pending_ids"],
            "error": str(error or "") or None,
            "unavailable": str(context["unavailable"] or "") or None,
        }
        response = JsonResponse(payload, status=status or (400 if error else context["status"]))
        return _busy(response, cause)
    if task_id is None and fr.account.is_admin:
        context["connection"] = _connection_panel(fr)
    response = render(request, "results/screen.html", context, status=status or context["status"])
    return _busy(response, cause)


def _connection_state(portal: Portal) -> tuple[str, str]:
    """The portal's state and a neutral reason, as the portal's people may read them. The
    recorded `state_reason` is for operators (the admin): it names operators and carries
    Bitrix24's codes, so it never reaches the screen."""
    if portal.state == Portal.State.ACTIVE:
        return pgettext("connection state", "Active"), ""
    if portal.state == Portal.State.BLOCKED and portal.blocked_by_operator:
        return pgettext("connection state", "Blocked"), _("Blocked by the app's operator.")
    if portal.state == Portal.State.BLOCKED:
        return pgettext("connection state", "Blocked"), _(
            "Waiting for the administrator who installed the app to open it again."
        )
    if portal.state == Portal.State.UNINSTALLED:
        return pgettext("connection state", "Uninstalled"), _(
            "The app was removed from this Bitrix24."
        )
    return pgettext("connection state", "New"), _("Waiting for the installation to finish.")


def _connection_panel(fr: Frame) -> dict:
    """What a portal admin sees of the app's connection: read from what the app recorded, so
    the page costs no call to Bitrix24 (the bindings are read by their own check)."""
    portal = fr.portal
    state, reason = _connection_state(portal)
    return {
        "state": state,
        "reason": reason,
        "last_refreshed_at": portal_last_refreshed_at(portal),
        "bindings": portal.bindings,
        "bindings_label": portal.get_bindings_display(),
        "bindings_detail": portal.bindings_detail,
        "bindings_checked_at": portal.bindings_checked_at,
    }


@csrf_exempt  # a cross-site form POST from the Bitrix24 frame, verified below instead
@require_POST
def screen(request):
    """Placement entry: verify the POST, learn who opened it, show the task's results."""
    language = frame_language(request.GET.get("LANG"))
    translation.activate(language)
    try:
        account = frame_account_open(post=request.POST, domain=request.GET.get("DOMAIN") or None)
    except FrameRefused as exc:
        logger.warning(
            "placement refused error=%s member_id=%s",
            exc.code,
            claimed_id(request.POST.get("member_id", "")),
        )
        return _refused(request, exc.message, exc.status, code=exc.code, cause=exc)
    services.result_changes_resume(account=account)
    token = frame.issue(frame.FrameSession(account.portal_id, account.pk, language))
    fr = Frame(account=account, token=token, language=language)
    placement = str(request.POST.get("PLACEMENT", "DEFAULT"))[:64].upper()
    task_id = _task_from_placement(
        placement, _placement_options(request.POST.get("PLACEMENT_OPTIONS", ""))
    )
    return _framed(_render_screen(request, fr, task_id), fr)


@frame_view
@require_http_methods(["GET", "POST"])
def task_results(request, fr: Frame):
    """The results of a task: the DEFAULT placement's picker and the page's own refresh."""
    task_id = _positive_int(request.POST.get("task") or request.GET.get("task"))
    if task_id is None:
        return _render_screen(request, fr, None, error=_("Enter a task number."), status=400)
    return _render_screen(request, fr, task_id)


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
        if _wants_json(request):
            return JsonResponse({"error": str(exc.message)}, status=exc.status)
        return _render_screen(request, fr, task_id, error=exc.message, status=exc.status)
    return _change_accepted(request, fr, change)


def _change_accepted(request, fr: Frame, change: ResultChange):
    """The answer to a change the app took: 200 whatever Bitrix24 said (the change is kept and
    its state shown). The screen's script gets only what changed, to lay over the list the
    person has: it never depends on reading the list again, which a busy portal may refuse.
    Without JavaScript the whole screen is shown, with the list if it can be read."""
    if not _wants_json(request):
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
        "reason": change.last_error_message,
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
        change = services.result_change_retry(change_id=change_id, account=fr.account)
    except ResultChange.DoesNotExist:
        if _wants_json(request):
            return JsonResponse({"error": str(_("Unknown change."))}, status=404)
        return _render_screen(request, fr, None, error=_("Unknown change."), status=404)
    except services.QueueFull as exc:
        task_id = ResultChange.objects.filter(pk=change_id).values_list("task_id", flat=True)[0]
        if _wants_json(request):
            return JsonResponse({"error": str(exc.message)}, status=exc.status)
        return _render_screen(request, fr, task_id, error=exc.message, status=exc.status)
    change = services.result_change_deliver(
        change_id=change.pk, limiter_max_wait=WEB_LIMITER_WAIT_S
    )
    return _change_accepted(request, fr, change)


@frame_view
@require_GET
def changes_state(request, fr: Frame):
    """The states of the page's queued changes, for its polling, each with the badge to show."""
    parts = request.GET.get("ids", "").split(",")[:200]
    ids = [number for part in parts if (number := _positive_int(part)) is not None]
    if services.delivers_inline():
        # No worker in inline mode: the open screen's polling is what retries due changes.
        for change_id in selectors.result_changes_due(account=fr.account):
            services.result_change_deliver(change_id=change_id, limiter_max_wait=WEB_LIMITER_WAIT_S)
    changes = selectors.result_changes_of(account=fr.account, ids=ids)
    return JsonResponse({"changes": [_change_state(request, fr, change) for change in changes]})


@csrf_exempt  # the expired frame token plus fresh Bitrix24 auth is the proof
@require_POST
def session_renew(request):
    """Trade fresh frame auth (BX24 `refreshAuth`) for a new frame token of the same account."""
    try:
        session = frame.read_for_renewal(frame.from_request(request))
    except frame.FrameTokenError:
        return _framed(JsonResponse({"error": "frame_invalid"}, status=403), None)
    try:
        account = frame_session_renew(
            portal_id=session.portal_id,
            account_id=session.account_id,
            access_token=request.POST.get("AUTH_ID", ""),
            refresh_token=request.POST.get("REFRESH_ID", ""),
            expires_in=request.POST.get("AUTH_EXPIRES", ""),
        )
    except FrameRefused as exc:
        return _busy(_framed(JsonResponse({"error": exc.code}, status=exc.status), None), exc)
    services.result_changes_resume(account=account)
    token = frame.issue(frame.FrameSession(account.portal_id, account.pk, session.language))
    return _framed(JsonResponse({"token": token}), None)


@frame_view
@require_POST
def rebind(request, fr: Frame):
    """A portal admin checks the app's bindings and binds again what is missing (the DEFAULT
    placement's connection panel)."""
    if not fr.account.is_admin:
        return _render_screen(
            request, fr, None, error=_("Only a Bitrix24 administrator can do this."), status=403
        )
    try:
        portal = portal_bindings_check(
            portal_id=fr.portal.pk,
            account_id=fr.account.pk,
            app_url=app_url(request),
            limiter_max_wait=WEB_LIMITER_WAIT_S,
        )
    except BitrixUnavailable as exc:
        # The portal's budget is spoken for (another admin's checks, a burst of edits): say so
        # at once rather than hold one of the threads every portal's screens are served by.
        busy = _("Bitrix24 is busy right now. Try again in a minute.")
        return _render_screen(request, fr, None, error=busy, status=503, cause=exc)
    except BitrixError:
        return _render_screen(
            request, fr, None, error=_("Bitrix24 did not answer; try again later."), status=502
        )
    fr.account.portal = portal
    if portal.bindings == Portal.Bindings.MISSING:
        error = _("Bitrix24 did not bind everything: %(detail)s") % {
            "detail": portal.bindings_detail
        }
        return _render_screen(request, fr, None, error=error, status=502)
    return _render_screen(
        request, fr, None, notice=_("The Results tab and the app's events are bound.")
    )
