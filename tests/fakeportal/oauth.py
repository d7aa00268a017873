"""The OAuth side (§2): the authorization server's ``/oauth/token/`` and
``/rest/app.info`` (its own listener, ``fake.oauth_url``), and the portal's
``/oauth/authorize/`` (on each portal listener)."""

from __future__ import annotations

import time
from html import escape
from urllib.parse import urlencode

from .server import DROP, Request, Response
from .state import CODE_TTL_S, AuthCode
from .util import issued, new_hex

# Injected token-endpoint errors: code -> (HTTP status, body).
# [UNCONFIRMED] statuses of PAYMENT_REQUIRED and insufficient_scope/invalid_scope
# on the OAuth server (§2.5); the emulator uses the SDK classes' statuses.
TOKEN_ERRORS: dict[str, tuple[int, dict]] = {
    "invalid_request": (400, {"error": "invalid_request", "error_description": "Invalid request"}),
    "invalid_client": (400, {"error": "invalid_client", "error_description": "Invalid client"}),
    "wrong_client": (200, {"error": "wrong_client"}),
    "invalid_grant": (400, {"error": "invalid_grant", "error_description": "Invalid grant"}),
    "bad_verification_code": (400, {"error": "bad_verification_code"}),
    "insufficient_scope": (401, {"error": "insufficient_scope"}),
    "invalid_scope": (
        403,
        {
            "error": "INVALID_SCOPE",
            "error_description": "Given scope exceeds permissions associated with given grant",
        },
    ),
    "PAYMENT_REQUIRED": (
        401,
        {"error": "PAYMENT_REQUIRED", "error_description": "Payment required"},
    ),
    "NOT_INSTALLED": (
        401,
        {"error": "NOT_INSTALLED", "error_description": "Application not installed"},
    ),
}


def _error(code: str, description: str | None = None, status: int | None = None) -> Response:
    default_status, body = TOKEN_ERRORS.get(code, (400, {"error": code}))
    body = dict(body)
    if description is not None:
        body["error_description"] = description
    return Response.json(body, default_status if status is None else status)


def _gateway_error(status: int) -> Response:
    reason = {
        500: "Internal Server Error",
        502: "Bad Gateway",
        503: "Service Temporarily Unavailable",
        504: "Gateway Time-out",
    }.get(status, "Error")
    return Response.html(
        f"<html><head><title>{status} {reason}</title></head>"
        f"<body><h1>{status} {reason}</h1></body></html>",
        status,
    )


TOKEN_PARAMS_MODES = ("both", "query", "body", "get_only")
"""``fake.token_params``: where ``/oauth/token/`` reads its parameters (see ``_token_params``)."""
MISSING_CLIENT_ID_ERRORS = ("invalid_request", "wrong_client")
"""``fake.missing_client_id_error``: the answer to a token request without ``client_id``."""


def _token_params(fake, req: Request) -> dict | None:
    """The token request's parameters as this server reads them; ``None``: 405 to this method.

    [UNCONFIRMED] whether oauth.bitrix.info reads a POST body: the docs and two SDKs send GET
    with a query string, b24jssdk a POST form (verified on oauth.bitrix24.tech only). Each
    plausible answer is a mode: "both" (default) reads the query and a POST body, "query"
    ignores any body, "body" ignores the query string, "get_only" answers 405 to anything but
    GET. A request whose parameters are not read finds none: invalid_request
    ``No "client_id" parameter found`` (or ``fake.missing_client_id_error``).
    """
    mode = fake.token_params
    if mode == "get_only" and req.method != "GET":
        return None
    if mode == "query" or mode == "get_only":
        return _strings(dict(req.query))
    if mode == "body":
        return _strings(_body_params(req))
    return _params(req)


def _strings(params: dict) -> dict:
    return {k: v for k, v in params.items() if isinstance(v, str)}


def _body_params(req: Request) -> dict:
    if not req.body:
        return {}
    if "json" in req.content_type:
        try:
            data = req.json()
        except ValueError:
            data = None
        return data if isinstance(data, dict) else {}
    return req.form()


def _params(req: Request) -> dict:
    """The query string and a POST body (form or JSON) together, the body winning."""
    return _strings({**req.query, **_body_params(req)})


# ---- /oauth/token/


def _grant(fake, params: dict, call: dict) -> Response:
    """Process a token request. Caller holds fake.lock."""
    client_id = params.get("client_id") or ""
    call["client_id"] = client_id
    grant_type = params.get("grant_type") or ""
    call["grant_type"] = grant_type
    if not client_id:
        if fake.missing_client_id_error == "wrong_client":
            # A server that looks the empty client_id up like any other (200, §2.5).
            return _error("wrong_client")
        return _error("invalid_request", 'No "client_id" parameter found')
    if client_id != fake.client_id:
        return _error("wrong_client")
    if not params.get("client_secret"):
        # [UNCONFIRMED] a missing secret: emulator guess invalid_request (400).
        return _error("invalid_request", 'No "client_secret" parameter found')
    if params["client_secret"] != fake.client_secret:
        return _error("invalid_client", "Invalid client secret")
    now = fake.now()
    if grant_type == "authorization_code":
        code = params.get("code")
        if not code:
            return _error("invalid_request", 'No "code" parameter found')
        record = fake.codes.get(code)
        if record is None or record.used or record.expires_at <= now:
            return _error("invalid_grant", "Invalid authorization code")
        record.used = True  # single use
        member_id, user_id = record.member_id, record.user_id
    elif grant_type == "refresh_token":
        token = params.get("refresh_token")
        if not token:
            return _error("invalid_request", 'No "refresh_token" parameter found')
        record = fake.refresh_tokens.get(token)
        if record is not None:
            call["member_id"], call["user_id"] = record.member_id, record.user_id
            if (
                fake.not_installed_error != "invalid_grant"
                and fake.portal(record.member_id).uninstalled
            ):
                # §2.5: invalid_client is also "app not installed on that portal".
                return _error(fake.not_installed_error, "Application not installed")
        if record is None or record.used or record.revoked or record.expires_at <= now:
            return _error("invalid_grant", "Invalid refresh token")
        portal = fake.portal(record.member_id)
        if portal.payment_required:
            return _error("PAYMENT_REQUIRED")
        # Rotation: the used refresh token dies (single use, §2.4).
        record.used = True
        member_id, user_id = record.member_id, record.user_id
    else:
        # [UNCONFIRMED] an unknown grant_type: emulator guess invalid_request.
        return _error("invalid_request", "Invalid grant_type parameter or parameter missing")
    portal = fake.portal(member_id)
    if portal.payment_required:
        return _error("PAYMENT_REQUIRED")
    call["member_id"], call["user_id"] = member_id, user_id
    return Response.json(portal.issue_tokens(user_id))


def token_endpoint(fake, req: Request) -> Response:
    params = _token_params(fake, req)
    call = {
        "grant_type": (params or {}).get("grant_type"),
        "client_id": (params or {}).get("client_id"),
        "http_method": req.method,
        "ok": False,
        "error": None,
        "user_id": None,
        "member_id": None,
        "time": fake.now(),
    }
    if params is None:
        # [UNCONFIRMED] what a GET-only server says to a POST: a plain 405 page with Allow.
        # Refused before the token logic: a queued fault waits for the next call.
        call["error"] = "method_not_allowed"
        fake._record_token_call(call)
        return Response.html(
            "<html><head><title>405 Not Allowed</title></head>"
            "<body><h1>405 Not Allowed</h1></body></html>",
            405,
            headers=[("Allow", "GET")],
        )
    failure = fake._pop_token_failure()
    if failure is not None:
        kind = failure["error"]
        call["error"] = kind
        if kind == "timeout":
            fake._record_token_call(call)
            time.sleep(
                failure["delay_s"] if failure["delay_s"] is not None else fake.timeout_delay_s
            )
            return _gateway_error(503)
        if kind == "drop":
            fake._record_token_call(call)
            return DROP
        if kind.isdigit():
            fake._record_token_call(call)
            return _gateway_error(int(kind))
        if kind != "lost_response":
            fake._record_token_call(call)
            return _error(kind, status=failure["status"])
    with fake.lock:
        resp = _grant(fake, params, call)
        body = resp.json_body() or {}
        call["ok"] = resp.status == 200 and "access_token" in body
        if not call["ok"]:
            call["error"] = body.get("error")
        elif failure is not None:
            call["error"] = "lost_response"  # processed (tokens rotated), answer lost
        fake.token_calls.append(call)
    if failure is not None:  # lost_response
        return DROP
    return resp


# ---- app.info on the OAuth server (§2.7)


def app_info(fake, req: Request) -> Response:
    params = _params(req)
    token_value = params.get("auth")
    with fake.lock:
        now = fake.now()
        token = fake.access_tokens.get(token_value) if token_value else None
        if not token_value:
            # [UNCONFIRMED] no auth at all on the OAuth server: guess 401 NO_AUTH_FOUND.
            return Response.json(
                {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"}, 401
            )
        if token is None or token.revoked:
            return Response.json(
                {
                    "error": "invalid_token",
                    "error_description": "Unable to get application by token",
                },
                401,
            )
        if token.expires_at <= now:
            return Response.json(
                {
                    "error": "expired_token",
                    "error_description": "The access token provided has expired.",
                },
                401,
            )
        portal = fake.portal(token.member_id)
        result = {
            "client_id": token.client_id or fake.client_id,
            "scope": token.scope,
            # [UNCONFIRMED] exact format of `expires`: ISO 8601 of the token expiry.
            "expires": portal.iso(token.expires_at),
            "install": {
                "installed": portal.installed,
                "version": str(portal.app_version),
                "status": portal.status,
                "scope": portal.scopes,
                "domain": portal.domain,
                "uri": portal.url,
                "client_endpoint": portal.client_endpoint,
                "member_id": portal.member_id,
                # [UNCONFIRMED] meaning of member_type; the SDK fixture value.
                "member_type": "user",
            },
            "user_id": str(token.user_id)
            if fake.app_info_user_id is None
            else fake.app_info_user_id,
        }
        finish = fake.now()
        time_block = {
            "start": now,
            "finish": finish,
            "duration": finish - now,
            "processing": finish - now,
            "date_start": portal.iso(now),
            "date_finish": portal.iso(finish),
        }
    return Response.json({"result": result, "time": time_block})


def handle_server(fake, req: Request) -> Response:
    """The OAuth server listener."""
    record = {
        "path": req.path,
        "api": "oauth",
        "method_name": None,
        "http_method": req.method,
        "query": req.query,
        "headers": req.headers,
        "body": req.parsed_body(),
        "raw_body": req.body,
        "status": None,
        "idempotency_key": None,
        "replayed": False,
        "time": fake.now(),
    }
    path = req.path
    if fake.transport.unresponsive:
        record["injected"] = "unresponsive"
        with fake.lock:
            fake.requests.append(record)
        fake.transport.hold(fake._listener)
        return DROP
    if path.rstrip("/") == "/oauth/token":
        record["method_name"] = "oauth.token"
        resp = token_endpoint(fake, req)
    elif path in ("/rest/app.info", "/rest/app.info.json"):
        record["method_name"] = "app.info"
        resp = app_info(fake, req)
    else:
        resp = Response.json(
            {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}, 404
        )
    record["status"] = None if resp is DROP else resp.status
    if resp is not DROP:
        resp = fake.transport.shape(resp, record)
    with fake.lock:
        fake.requests.append(record)
    return resp


# ---- /oauth/authorize/ on a portal (§2.2)


def _error_page(portal, title: str, text: str) -> Response:
    # The failure is shown to the user on a Bitrix24 page; the app gets no redirect.
    return Response.html(
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title></head><body style='font-family:sans-serif;margin:40px'>"
        f"<h1>{escape(title)}</h1><p class='oauth-error'>{escape(text)}</p>"
        f"<p><small>Bitrix24 (fake) &middot; {escape(portal.domain)}</small></p></body></html>"
    )


def authorize(portal, req: Request) -> Response:
    fake = portal.fake
    query = req.query
    client_id = query.get("client_id")
    with fake.lock:
        if client_id != fake.client_id:
            return _error_page(
                portal, "Authorization error", "Application not found (wrong client_id)."
            )
        if not portal.installed:
            return _error_page(
                portal, "Authorization error", "The application is not installed on this Bitrix24."
            )
        user = None
        as_user = query.get("as")
        if isinstance(as_user, str) and as_user.isdigit():
            user = portal.users.get(int(as_user))
        if user is None and fake.authorize_as_user is not None:
            user = portal.users.get(int(fake.authorize_as_user))
        if user is None:
            admins = [u for u in portal.users.values() if u.admin]
            user = admins[0] if admins else next(iter(portal.users.values()), None)
        if user is None:
            return _error_page(portal, "Authorization error", "No user to authorize.")
        code = issued(new_hex(16))
        fake.codes[code] = AuthCode(
            code, portal.member_id, user.id, portal.scopes, fake.now() + CODE_TTL_S
        )
        pairs = [("code", code)]
        if isinstance(query.get("state"), str):
            pairs.append(("state", query["state"]))
        pairs += [
            ("domain", portal.domain),
            ("member_id", portal.member_id),
            ("scope", portal.scopes),
            ("server_domain", fake.oauth_host),
        ]
        target = fake.redirect_uri
    sep = "&" if "?" in target else "?"
    return Response.redirect(target + sep + urlencode(pairs))
