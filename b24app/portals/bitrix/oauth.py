"""The Bitrix24 authorization server (§2): token exchange, refresh, trusted ``app.info``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
from oauthlib.oauth2 import InsecureTransportError, OAuth2Error
from requests_oauthlib import OAuth2Session

from b24app.logs import SecretMaskingFilter
from b24app.masking import redact
from b24app.portals.bitrix.config import BitrixConfig, TokenMethod, TokenSet, _bare_origin
from b24app.portals.bitrix.errors import BitrixError, UnsafeURL, _ErrorInfo
from b24app.portals.bitrix.netguard import check_base_url
from b24app.portals.bitrix.transport import (
    _bounded_request,
    _json_body,
    _log_exchange,
    _transport_error,
    build_session,
)

__all__ = ["OAuthServer", "oauth_origin_for"]

logger = logging.getLogger("b24app.bitrix")


def oauth_origin_for(server_endpoint: str, config: BitrixConfig) -> str:
    """The allow-listed OAuth server origin for a ``server_endpoint`` such as ``…/rest/``.

    The normalised origin must be exactly one of ``config.oauth_servers``; ``http`` only with
    ``allow_private``. Raises :class:`UnsafeURL` otherwise.
    """
    origin = _bare_origin(
        server_endpoint, allow_http=config.allow_private, paths=("", "/", "/rest", "/rest/")
    )
    if origin not in config.oauth_servers:
        raise UnsafeURL(
            "OAUTH_SERVER_NOT_ALLOWED", f"{origin} is not one of the allowed OAuth servers"
        )
    return origin


def _token_transport_error(
    method: str, host: str, exc: requests.RequestException, *, started: float, how: str
) -> BitrixError:
    """A token request that got no answer, logged. A GET's is raised by the caller outside its
    `except` block: requests' exception carries the URL, and a GET's URL the secrets."""
    failure = _transport_error(exc, host)
    _log_exchange(
        method, "oauth", host, status=None, started=started, error=failure.code, http=how.upper()
    )
    return failure


def _check_oauth_answer(
    method: str,
    host: str,
    response: requests.Response,
    body: Any,
    secrets: Iterable[str],
    started: float,
) -> None:
    """Log one OAuth-server exchange and raise its typed error, if it answered with one."""
    error = _ErrorInfo.from_response(response, body, secrets)
    _log_exchange(
        method,
        "oauth",
        host,
        status=response.status_code,
        started=started,
        error=error.code if error else None,
        http=response.request.method or "POST",
    )
    if error is not None:
        raise error.exception()


class _DropDebugRecords(logging.Filter):
    """requests-oauthlib logs token request bodies and token responses at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


_oauthlib_logger = logging.getLogger("requests_oauthlib.oauth2_session")
if not any(isinstance(f, _DropDebugRecords) for f in _oauthlib_logger.filters):
    _oauthlib_logger.addFilter(_DropDebugRecords())

# urllib3 puts request URLs in its records (the request line at DEBUG, retries and redirects at
# WARNING/INFO), and a token request sent by GET carries client_secret, refresh_token or code in
# its query. Mask them on these loggers themselves, before any handler sees the record: the
# stdout handler masks too, but not for handlers that run before it or without it (one on a
# urllib3 logger, an error tracker's logging hook).
_URL_LOGGERS = (
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.poolmanager",
    "urllib3.util.retry",
)
for _name in _URL_LOGGERS:
    _url_logger = logging.getLogger(_name)
    if not any(isinstance(f, SecretMaskingFilter) for f in _url_logger.filters):
        _url_logger.addFilter(SecretMaskingFilter())


class _TokenMethods:
    """Which way of sending a token request (:data:`TokenMethod`) each OAuth server origin was
    seen to read, for this process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._working: dict[str, TokenMethod] = {}
        self._wrong_client_tried: set[str] = set()

    def get(self, origin: str) -> TokenMethod | None:
        with self._lock:
            return self._working.get(origin)

    def learn(self, origin: str, method: TokenMethod) -> None:
        with self._lock:
            self._working[origin] = method

    def try_after_wrong_client(self, origin: str) -> bool:
        """True the first time only, per origin: see :meth:`OAuthServer._unread`."""
        with self._lock:
            if origin in self._wrong_client_tried:
                return False
            self._wrong_client_tried.add(origin)
            return True

    def clear(self) -> None:
        with self._lock:
            self._working.clear()
            self._wrong_client_tried.clear()


_token_methods = _TokenMethods()

_OTHER_METHOD: dict[TokenMethod, TokenMethod] = {"post": "get", "get": "post"}


class _OAuthTokenSession(OAuth2Session):
    """requests-oauthlib's session with every request under the transport's deadline and size
    cap (:func:`_bounded_request`), as the app's own requests are."""

    transport_config: BitrixConfig

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.pop("timeout", None)
        kwargs.pop("stream", None)
        parent = super().request
        return _bounded_request(
            lambda **transport: parent(method, url, *args, **kwargs, **transport),
            self.transport_config,
        )


class OAuthServer:
    """The Bitrix24 authorization server (§2): token exchange, refresh, trusted ``app.info``.

    Every method takes the OAuth server as stored for the portal (``server_endpoint`` or its
    origin) and talks only to it when it is allow-listed (:func:`oauth_origin_for`). Redirects
    are never followed.

    Token requests (:meth:`refresh`, :meth:`exchange_code`) go as a POST form first, so that no
    secret is in a URL. The docs and two official SDKs send them by GET with a query string, and
    whether every OAuth server reads a POST body is not known, so a request is sent once more the
    other way (the query string, or back to the body), only when the answer proves the server
    read none of its parameters (:meth:`_unread`): then it never saw the refresh token or code
    either, and sending it again cannot spend it twice. Any other answer, a timeout or a lost
    answer is raised as it is. The way that worked is remembered per origin for the process
    (:meth:`token_method`) and used first from then on; each returned :class:`TokenSet` says
    how it was fetched (``request_method``).
    """

    def __init__(self, config: BitrixConfig, session: requests.Session | None = None) -> None:
        self._config = config
        self._session = session if session is not None else build_session(config)

    def token_method(self, server_origin: str) -> TokenMethod | None:
        """How this process sends token requests to this OAuth server: the way of the last one
        that succeeded, ``None`` before any has (the first goes by POST)."""
        return _token_methods.get(oauth_origin_for(server_origin, self._config))

    @staticmethod
    def forget_token_methods() -> None:
        """Forget what :meth:`token_method` learnt, for every server (tests; a server change)."""
        _token_methods.clear()

    def refresh(self, server_origin: str, refresh_token: str) -> TokenSet:
        """Trade a refresh token for a new pair (§2.3). The old refresh token is spent."""
        origin = oauth_origin_for(server_origin, self._config)
        params = {
            "grant_type": "refresh_token",
            "client_id": self._config.client_id,
            "client_secret": self._config.client_secret,
            "refresh_token": refresh_token,
        }
        return self._token_request(
            origin,
            lambda how: self._send_form(
                f"{origin}/oauth/token/", "oauth.token", params, secrets=(refresh_token,), how=how
            ),
        )

    def exchange_code(self, server_origin: str, code: str) -> TokenSet:
        """Trade an authorization code (valid 30 s) for tokens (§2.2), via requests-oauthlib.

        For an ``http`` OAuth server (``allow_private`` testing only) oauthlib also needs
        ``OAUTHLIB_INSECURE_TRANSPORT=1`` in the environment.
        """
        origin = oauth_origin_for(server_origin, self._config)
        return self._token_request(origin, lambda how: self._fetch_token(origin, code, how))

    def app_info(self, server_origin: str, access_token: str) -> dict[str, Any]:
        """Trusted ``app.info`` on the OAuth server (§2.7): ``client_id``, ``install{…}``, …"""
        origin = oauth_origin_for(server_origin, self._config)
        body = self._send_form(
            f"{origin}/rest/app.info", "app.info", {"auth": access_token}, secrets=(access_token,)
        )
        result = body.get("result")
        if not isinstance(result, dict):
            raise BitrixError("INVALID_RESPONSE", "app.info returned no result object")
        return result

    def authorize_url(self, portal_base_url: str, state: str) -> str:
        """Where to send the browser to start the code flow (§2.2, no ``redirect_uri``)."""
        origin = check_base_url(portal_base_url, allow_private=self._config.allow_private)
        query = urlencode({"client_id": self._config.client_id, "state": state})
        return f"{origin}/oauth/authorize/?{query}"

    # -- internals --

    def _token_request(
        self, origin: str, send: Callable[[TokenMethod], Mapping[str, Any]]
    ) -> TokenSet:
        """``send`` the token request the way that works for ``origin`` (POST until one is
        known), the other way once more if the answer proves it was not read."""
        known = _token_methods.get(origin)
        how: TokenMethod = known or "post"
        try:
            answer = send(how)
        except BitrixError as exc:
            if not self._unread(exc, origin, known):
                raise
            tried, how = how, _OTHER_METHOD[how]
            logger.warning(
                "bitrix24 oauth.token host=%s read no parameter of the %s request (error=%s); "
                "sending it by %s",
                urlsplit(origin).netloc,
                tried.upper(),
                exc.code,
                how.upper(),
            )
            answer = send(how)
        tokens = TokenSet.from_response(answer)
        _token_methods.learn(origin, how)
        return replace(tokens, request_method=how)

    @staticmethod
    def _unread(exc: BitrixError, origin: str, known: TokenMethod | None) -> bool:
        """Does this answer prove the server read none of the request's parameters?

        * HTTP 405: the server refused the HTTP method before reading anything.
        * ``invalid_request``: "a required parameter is missing" (``No "client_id" parameter
          found``). Every token request carries all of them, so the server did not read where
          they were. It is decided by the code, not the localised text; an ``invalid_request``
          for any other reason is a refusal before any grant, so nothing was spent either.
        * ``wrong_client``, while no way is known for this server: a server that read no
          ``client_id`` may call the empty one unknown. It identified no app, so it spent
          nothing; but a really wrong ``B24_CLIENT_ID`` answers the same, so this is tried once
          per server and process, which keeps such a deployment from sending the secret in a
          URL on every refresh. Once a way is known, ``wrong_client`` is about the client id.

        Anything else (``invalid_grant``, ``invalid_client``, 5xx, timeouts, a lost answer) may
        come from a server that read the request, and the refresh token may be spent: never
        sent again.
        """
        if isinstance(exc, UnsafeURL) or exc.status is None:
            return False
        if exc.status == 405 or exc.code == "invalid_request":
            return True
        return (
            exc.code == "wrong_client"
            and known is None
            and _token_methods.try_after_wrong_client(origin)
        )

    def _fetch_token(self, origin: str, code: str, how: TokenMethod) -> Mapping[str, Any]:
        """The authorization-code request through requests-oauthlib's ``fetch_token``."""
        host = urlsplit(origin).netloc
        secrets = (code, self._config.client_secret)
        oauth = _OAuthTokenSession(self._config.client_id)
        oauth.transport_config = self._config
        # Reuse the shared session's (guarded) adapters; the shared session owns and closes them.
        for prefix, adapter in self._session.adapters.items():
            oauth.mount(prefix, adapter)
        oauth.max_redirects = 0
        started = time.monotonic()

        def check_response(response: requests.Response) -> requests.Response:
            _check_oauth_answer(
                "oauth.token", host, response, _json_body(response), secrets, started
            )
            return response

        oauth.register_compliance_hook("access_token_response", check_response)
        headers = {"Accept": "application/json", "User-Agent": self._config.user_agent}
        if how == "post":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        failure: BitrixError
        try:
            return oauth.fetch_token(
                f"{origin}/oauth/token/",
                code=code,
                client_secret=self._config.client_secret,
                include_client_id=True,
                method=how.upper(),
                headers=headers,
            )
        except requests.RequestException as exc:
            failure = _token_transport_error("oauth.token", host, exc, started=started, how=how)
            if how == "post":
                raise failure from exc
        except InsecureTransportError as exc:
            raise UnsafeURL(
                "INSECURE_TRANSPORT",
                "oauthlib refuses http; set OAUTHLIB_INSECURE_TRANSPORT=1 for local testing",
            ) from exc
        except OAuth2Error as exc:
            raise BitrixError(
                "INVALID_TOKEN_RESPONSE", redact(str(exc.description or exc.error), secrets)
            ) from exc
        # A GET's URL carries the secrets and requests' exceptions carry the URL: raise outside
        # the except block, so the error is not chained to it (not even as __context__).
        raise failure

    def _send_form(
        self,
        url: str,
        method: str,
        data: Mapping[str, str],
        *,
        secrets: Iterable[str],
        how: TokenMethod = "post",
    ) -> dict[str, Any]:
        """Send a form to the OAuth server, as a POST body or (``how="get"``) a query string;
        returns the JSON object or raises the typed error."""
        host = urlsplit(url).netloc
        secrets = (*secrets, self._config.client_secret)
        headers = {"Accept": "application/json", "User-Agent": self._config.user_agent}
        started = time.monotonic()
        failure: BitrixError
        fields = {"params" if how == "get" else "data": dict(data)}
        try:
            response = _bounded_request(
                lambda **transport: self._session.request(
                    how.upper(), url, **fields, headers=headers, allow_redirects=False, **transport
                ),
                self._config,
            )
        except requests.RequestException as exc:
            failure = _token_transport_error(method, host, exc, started=started, how=how)
            if how == "post":
                raise failure from exc
        else:
            body = _json_body(response)
            _check_oauth_answer(method, host, response, body, secrets, started)
            return body
        # As in _fetch_token: a GET's URL (in requests' exception) must not ride along.
        raise failure
