"""Server errors, answered so that a person in the Bitrix24 frame can read them.

Django's own 500 page forbids framing like every other page, so inside the task card a crash (the
database restarting, say) shows as the browser's "refused to connect". This handler shows a short
message in the language the frame asked for, lets the portal named in the request's query frame
it (as refusal pages do: the page holds nothing but the message), and answers JSON to the open
screen's requests. It reads nothing from the database, which may be what just failed.
"""

from __future__ import annotations

from django.http import HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.utils import translation
from django.utils.translation import gettext as _

from b24app.framing import allow_portal_framing, claimed_portal_origin
from b24app.languages import frame_language


def server_error(request) -> HttpResponse:
    """`handler500`: a readable, frameable 500 without a trace of what failed."""
    language = frame_language(request.GET.get("LANG") or request.GET.get("lang"))
    with translation.override(language):
        message = _("Something went wrong on our side. Try again in a minute.")
        if "application/json" in request.headers.get("Accept", ""):
            response = JsonResponse({"error": "server_error", "message": message}, status=500)
        else:
            # No request context: its processors may touch the session, i.e. the database.
            html = render_to_string("500.html", {"message": message})
            response = HttpResponse(html, status=500)
    claimed = claimed_portal_origin(request)
    if claimed:
        allow_portal_framing(response, claimed)
    return response
