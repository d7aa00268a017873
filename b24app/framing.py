"""Who may put our pages in a frame.

Every response forbids framing (`X-Frame-Options: DENY` from Django's middleware and
`Content-Security-Policy: frame-ancestors 'none'` from here) unless a view marked it with
`allow_portal_framing`, which allows exactly one portal origin and drops `X-Frame-Options`
(browsers ignore `ALLOW-FROM`, and `DENY` would win over the CSP in some of them).
"""

from __future__ import annotations

import re

from django.http import HttpResponse

_ATTRIBUTE = "_b24_frame_ancestor"
_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?(?::\d{1,5})?$")


def claimed_portal_origin(request) -> str | None:
    """The portal origin a Bitrix24 frame request names in its query (`DOMAIN`, `PROTOCOL`),
    when it is a plain host name. Unverified: use it only to let a page that shows nothing but
    a refusal appear in that portal's frame (a refusal nobody sees helps nobody)."""
    domain = request.GET.get("DOMAIN", "").strip().lower()
    if not _HOST.fullmatch(domain):
        return None
    scheme = "http" if request.GET.get("PROTOCOL") == "0" else "https"
    return f"{scheme}://{domain}"


def allow_portal_framing(response: HttpResponse, portal_origin: str) -> HttpResponse:
    """Let `portal_origin` (scheme://host[:port], already verified) frame this response."""
    setattr(response, _ATTRIBUTE, portal_origin)
    response.xframe_options_exempt = True
    return response


class FramePolicyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        origin = getattr(response, _ATTRIBUTE, None)
        if origin:
            policy = f"frame-ancestors {origin}"
            if "X-Frame-Options" in response:
                del response["X-Frame-Options"]
        else:
            policy = "frame-ancestors 'none'"
        existing = response.get("Content-Security-Policy", "")
        if "frame-ancestors" not in existing:
            response["Content-Security-Policy"] = "; ".join(
                filter(None, (existing.strip("; "), policy))
            )
        return response
