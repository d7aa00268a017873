"""Outgoing events (§1.4, §4.2, §4.3): bodies with PHP bracket keys, sent as
``application/x-www-form-urlencoded`` POSTs, without retries (§4.1)."""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urlencode

from .util import php_flatten

LIFECYCLE_EVENTS = {"ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL"}

# Key order of the `auth` block as in the §1.4 decoded body.
AUTH_ORDER = [
    "access_token",
    "expires",
    "expires_in",
    "scope",
    "domain",
    "server_endpoint",
    "status",
    "client_endpoint",
    "member_id",
    "user_id",
    "refresh_token",
    "application_token",
]


def build_pairs(
    event: str, event_handler_id, data: dict, ts: int, auth: dict
) -> list[tuple[str, str]]:
    envelope: dict = {"event": event}
    if event_handler_id is not None:
        envelope["event_handler_id"] = str(event_handler_id)
    envelope["data"] = data
    envelope["ts"] = str(ts)
    ordered = {k: auth[k] for k in AUTH_ORDER if k in auth}
    ordered.update({k: val for k, val in auth.items() if k not in ordered})
    envelope["auth"] = ordered
    return php_flatten(envelope)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the queue does not follow redirects: report the 3xx as is


_opener = urllib.request.build_opener(_NoRedirect)


def post_form(url: str, pairs: list[tuple[str, str]], timeout: float) -> tuple[int | None, str]:
    """POST the pairs; returns (status, body text), or (None, "error: ...") when
    the app could not be reached (never raises)."""
    data = urlencode(pairs).encode("ascii")
    request = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "Bitrix24 Webhook Engine (fakeportal)",
        },
    )
    try:
        with _opener.open(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        try:
            body = err.read().decode("utf-8", "replace")
        except OSError:
            body = ""
        return err.code, body
    except (urllib.error.URLError, OSError) as err:
        return None, f"error: {err}"
