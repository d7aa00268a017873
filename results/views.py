"""The embedded results screen.

For now `POST /b24/app/` renders a placeholder so the app can be opened inside a Bitrix24 frame;
the verified screen replaces it with the results issue.
"""

from __future__ import annotations

import re

from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from b24app.framing import allow_portal_framing

_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?(?::\d{1,5})?$")


def _portal_origin(request) -> str | None:
    domain = request.GET.get("DOMAIN", "").strip().lower()
    if not _HOST.fullmatch(domain):
        return None
    scheme = "https" if request.GET.get("PROTOCOL", "1") == "1" else "http"
    return f"{scheme}://{domain}"


@csrf_exempt  # a cross-site form POST from the Bitrix24 frame; CSRF does not apply to it
@require_http_methods(["GET", "POST"])
def screen(request):
    response = render(request, "results/placeholder.html")
    origin = _portal_origin(request)
    if origin:
        allow_portal_framing(response, origin)
    return response
