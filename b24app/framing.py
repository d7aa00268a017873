"""Who may put our pages in a frame.

Every response forbids framing: `X-Frame-Options: DENY` from Django's middleware and
`Content-Security-Policy: frame-ancestors 'none'` from django-csp (`CONTENT_SECURITY_POLICY` in
the settings), unless a view marked it with `allow_portal_framing`. That replaces the response's
`frame-ancestors` with exactly one portal origin (django-csp's per-response `_csp_replace`, what
its `csp_replace` decorator sets) and exempts it from `X-Frame-Options` (browsers ignore
`ALLOW-FROM`, and `DENY` would win over the CSP in some of them). A page with a fuller policy of
its own (the results screen) names its directives the same way, with `policy_replace`.
"""

from __future__ import annotations

import re

from csp.constants import HEADER
from csp.middleware import CSPMiddleware
from csp.utils import build_policy
from django.conf import settings
from django.http import HttpResponse

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


def policy_replace(response: HttpResponse, directives: dict[str, list[str]]) -> HttpResponse:
    """Give this response its own values for `directives` (django-csp's per-response
    `_csp_replace`, what its `csp_replace` decorator sets); the rest of the policy stays the
    settings' default. Calls add up: a later one wins only for the directives it names."""
    response._csp_replace = {**(getattr(response, "_csp_replace", None) or {}), **directives}
    return response


def allow_portal_framing(response: HttpResponse, portal_origin: str) -> HttpResponse:
    """Let `portal_origin` (scheme://host[:port], already verified) frame this response."""
    policy_replace(response, {"frame-ancestors": [portal_origin]})
    response.xframe_options_exempt = True
    return response


class FramePolicyMiddleware(CSPMiddleware):
    """django-csp's middleware, outermost (so error pages of the middlewares below get the
    policy too). django-csp leaves the 404 and 500 pages alone while DEBUG is on, for the debug
    pages' inline scripts; the frame rule holds there too, as nothing else of the policy."""

    def process_response(self, request, response):
        response = super().process_response(request, response)
        if (
            settings.DEBUG
            and response.status_code in (404, 500)
            and HEADER not in response
            and not getattr(response, "_csp_exempt", False)
        ):
            replace = getattr(response, "_csp_replace", None) or {}
            ancestors = replace.get("frame-ancestors") or ["'none'"]
            response[HEADER] = build_policy(config={"frame-ancestors": ancestors})
        return response
