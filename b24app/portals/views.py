"""Bitrix24-facing endpoints: the install wizard, lifecycle events, the OAuth reconnect."""

from __future__ import annotations

import functools
import logging
import secrets

from django.contrib import admin, messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core import signing
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseBadRequest, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import translation
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from b24app import metrics
from b24app.framing import allow_portal_framing, claimed_portal_origin
from b24app.languages import frame_language
from b24app.logs import claimed_id
from b24app.portals import selectors, services
from b24app.portals.forms import bracket_decode
from b24app.portals.models import Portal
from b24app.portals.ratelimit import busy_retry_after_s
from b24app.portals.site import app_url

logger = logging.getLogger("b24app.portals")

OAUTH_STATE_SALT = "b24app.portals.oauth"
OAUTH_STATE_MAX_AGE = 600
OAUTH_SESSION_KEY = "b24_oauth_nonce"
INSTALL_FIELDS = (
    "AUTH_ID",
    "AUTH_EXPIRES",
    "REFRESH_ID",
    "SERVER_ENDPOINT",
    "APPLICATION_TOKEN",
    "member_id",
)


EVENT_STATUS = {
    services.EventKind.APPLIED: 200,
    services.EventKind.UNCONFIRMED: 202,
    services.EventKind.MALFORMED: 400,
    services.EventKind.REFUSED: 401,
    services.EventKind.UNAVAILABLE: 503,
}
"""The HTTP status a lifecycle event's sender gets for each kind of outcome."""


@csrf_exempt  # a cross-site POST from the Bitrix24 frame, verified with the OAuth server instead
@require_POST
def install(request):
    translation.activate(frame_language(request.GET.get("LANG")))
    auth = {name: request.POST.get(name, "") for name in INSTALL_FIELDS}
    auth["DOMAIN"] = request.GET.get("DOMAIN", "")
    status, error, portal, cause = 200, None, None, None
    try:
        portal = services.portal_install(auth=auth, app_url=app_url(request))
    except services.PortalError as exc:
        cause = exc
        status = 503 if exc.code in ("not_configured", "unavailable") else 400
        if exc.code in ("rejected", "mismatch", "untrusted_server", "unsafe_portal", "not_admin"):
            status = 403
        error = exc.message
        logger.warning(
            "install refused error=%s member_id=%s", exc.code, claimed_id(auth["member_id"])
        )
    response = render(
        request,
        "portals/install.html",
        {"portal": portal, "error": error},
        status=status,
    )
    if status == 503:  # Bitrix24 busy (the portal's budget has no slot soon): when to come back
        response["Retry-After"] = str(busy_retry_after_s(cause))
    origin = portal.origin if portal is not None else claimed_portal_origin(request)
    if origin:
        allow_portal_framing(response, origin)
    return response


@csrf_exempt  # server-to-server POST from Bitrix24's event queue, verified per event
@require_POST
def events(request):
    payload = bracket_decode(request.POST.items())
    event = payload.get("event")
    auth = payload.get("auth")
    data = payload.get("data")
    if not isinstance(event, str) or not isinstance(auth, dict):
        logger.warning("event refused: malformed body")
        metrics.event_refused(services.EventKind.MALFORMED, "malformed_event")
        return JsonResponse({"error": "malformed_event"}, status=400)
    outcome = services.event_handle(
        event=event,
        data=data if isinstance(data, dict) else {},
        auth=auth,
        app_url=app_url(request),
    )
    status = EVENT_STATUS[outcome.kind]
    if not outcome.accepted:
        logger.warning(
            "event refused event=%s member_id=%s error=%s",
            event[:40],
            claimed_id(auth.get("member_id", "")),
            outcome.code,
        )
        metrics.event_refused(outcome.kind, outcome.code)
        response = JsonResponse({"error": outcome.code}, status=status)
        if status == 503:  # Bitrix24 or its OAuth server busy (for whoever resends)
            response["Retry-After"] = str(busy_retry_after_s(None))
        return response
    return JsonResponse({"outcome": outcome.code}, status=status)


OAUTH_PERMISSION = "portals.change_portal"


def _operator_may_reconnect(view):
    """Staff only (others go to the admin's login), and with `portals.change_portal`: a
    reconnect writes the portal's connection (403 otherwise)."""

    @staff_member_required
    @functools.wraps(view)
    def wrapped(request, *args, **kwargs):
        if not request.user.has_perm(OAUTH_PERMISSION):
            raise PermissionDenied("Reconnecting a portal needs the permission to change portals.")
        return view(request, *args, **kwargs)

    return wrapped


@_operator_may_reconnect
@require_http_methods(["GET", "POST"])
def oauth_start(request):
    """GET shows what is about to happen and a form; only its POST (with Django's CSRF token,
    so never from another site) starts the flow. A GET changes nothing, not even the session."""
    source = request.POST if request.method == "POST" else request.GET
    member_id = source.get("portal", "")
    portal = selectors.portal_by_member_id(member_id) if services.is_member_id(member_id) else None
    if portal is None:
        raise Http404("No such portal")
    if request.method == "GET":
        context = {
            **admin.site.each_context(request),
            "title": f"Reconnect {portal.domain} via OAuth",
            "portal": portal,
            "opts": Portal._meta,
        }
        return render(request, "portals/oauth_start.html", context)
    nonce = secrets.token_urlsafe(16)
    state = signing.dumps({"m": portal.member_id, "n": nonce}, salt=OAUTH_STATE_SALT)
    try:
        authorize = services.portal_reconnect_start(portal=portal, state=state)
    except services.PortalError as exc:
        messages.error(request, f"Cannot start the OAuth reconnect: {exc}")
        return redirect(reverse("admin:portals_portal_change", args=[portal.pk]))
    # The state is good only in this session: the callback compares its nonce with this one.
    request.session[OAUTH_SESSION_KEY] = nonce
    return redirect(authorize)


@_operator_may_reconnect
@require_GET
def oauth_callback(request):
    try:
        state = signing.loads(
            request.GET.get("state", ""), salt=OAUTH_STATE_SALT, max_age=OAUTH_STATE_MAX_AGE
        )
    except signing.BadSignature:
        return HttpResponseBadRequest("The reconnect link is invalid or expired; start again.")
    nonce = request.session.pop(OAUTH_SESSION_KEY, None)
    if not nonce or not secrets.compare_digest(str(state.get("n", "")), nonce):
        return HttpResponseBadRequest("This reconnect was not started from this browser.")
    if not services.is_member_id(str(state.get("m", ""))):
        return HttpResponseBadRequest("The reconnect link is invalid or expired; start again.")
    portal = selectors.portal_by_member_id(state["m"])
    if portal is None:
        raise Http404("No such portal")
    if request.GET.get("member_id") not in (None, portal.member_id):
        return HttpResponseBadRequest("Bitrix24 answered for another portal.")
    try:
        services.portal_reconnect(
            portal=portal, code=request.GET.get("code", ""), operator=request.user.get_username()
        )
    except services.PortalError as exc:
        messages.error(request, exc.message)
    else:
        portal = selectors.portal_by_member_id(portal.member_id)
        if portal.blocked_by_operator:
            messages.warning(
                request,
                f"{portal.domain}: the new tokens are stored, and the portal stays blocked by "
                'its operator. Use the "Unblock" action when it may work again.',
            )
        else:
            messages.success(request, f"{portal.domain} is reconnected.")
    return redirect(reverse("admin:portals_portal_change", args=[portal.pk]))
