"""Who may put our pages in a frame.

Every response forbids framing: `X-Frame-Options: DENY` from Django's middleware and
`Content-Security-Policy: frame-ancestors 'none'` from django-csp (`CONTENT_SECURITY_POLICY` in
the settings), unless a view marked it with `allow_portal_framing`. That replaces the response's
`frame-ancestors` with exactly one portal origin (django-csp's per-response `_csp_replace`, what
its `csp_replace` decorator sets) and drops `X-Frame-Options` (browsers ignore `ALLOW-FROM`, and
`DENY` would win over the CSP in some of them).
"""

from __future__ import annotations

import re
from dataclasses import asdict

from csp.constants import HEADER
from csp.middleware import CSPMiddleware
from csp.utils import build_policy
from django.conf import settings
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
    replace = dict(getattr(response, "_csp_replace", None) or {})
    replace["frame-ancestors"] = [portal_origin]
    response._csp_replace = replace
    response.xframe_options_exempt = True
    return response


def _frame_ancestors(policy: str) -> str:
    """The `frame-ancestors` directive of a policy, or ""."""
    for directive in policy.split(";"):
        if directive.strip().partition(" ")[0] == "frame-ancestors":
            return directive.strip()
    return ""


def _take(response: HttpResponse, header: str) -> str | None:
    """Remove `header` from `response` and return its value (None when it had none)."""
    value = response.get(header)
    if value is not None:
        del response[header]
    return value


class FramePolicyMiddleware(CSPMiddleware):
    """django-csp's middleware, outermost (so error pages of the middlewares below get the
    policy too), with what the frame rule needs beyond it:

    - A view that wrote a policy of its own (the screen's, `results.views.CSP`) keeps it, with
      this response's `frame-ancestors` appended (django-csp would leave that response alone).
      Moved into django-csp, that policy would change its order from one process to the next
      (django-csp 4 builds a policy from a set of directive names), and frame-ancestors would no
      longer come last.
    - django-csp leaves the 404 and 500 pages alone while DEBUG is on (for the debug pages'
      inline scripts); the policy here is `frame-ancestors` only, so those get it too.
    - A marked response never carries `X-Frame-Options`, whoever set it.
    """

    def process_response(self, request, response):
        written = _take(response, HEADER)
        response = super().process_response(request, response)
        debug_page = settings.DEBUG and response.status_code in (404, 500)
        if debug_page and HEADER not in response and not getattr(response, "_csp_exempt", False):
            parts = self.get_policy_parts(request=request, response=response)
            policy = build_policy(**asdict(parts))
            if policy:
                response[HEADER] = policy
        if written is not None:
            built = _take(response, HEADER) or ""
            ancestors = "" if _frame_ancestors(written) else _frame_ancestors(built)
            response[HEADER] = "; ".join(filter(None, (written.strip("; "), ancestors)))
        if getattr(response, _ATTRIBUTE, None) and "X-Frame-Options" in response:
            del response["X-Frame-Options"]
        return response
