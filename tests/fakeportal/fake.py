"""``FakeBitrix``: the fake OAuth server plus any number of fake portals."""

from __future__ import annotations

import threading
import time

from . import oauth
from .portal import FakePortal
from .server import Listener
from .transport import TransportFaults

DEFAULT_CLIENT_ID = "app.fake0000000001.00000001"
DEFAULT_CLIENT_SECRET = "fake-secret-0000000000000000000000000000000000000000"


class FakeBitrix:
    """Fake Bitrix24 OAuth server (its own listener) and portals (one listener each).

    One ``threading.RLock`` (``self.lock``) guards all state of the OAuth server
    and of every portal, so counters and single-use tokens are exact under
    concurrency.
    """

    def __init__(
        self,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        app_url: str = "http://localhost:8000",
        host: str = "127.0.0.1",
        app_code: str = "fakevendor.results",
    ):
        self.client_id = client_id
        self.client_secret = client_secret
        self.app_url = app_url
        self.app_code = app_code
        self.host = host
        self.lock = threading.RLock()

        self.access_tokens: dict = {}
        self.refresh_tokens: dict = {}
        self.codes: dict = {}
        self.portals: list[FakePortal] = []
        self.token_calls: list[dict] = []
        self.requests: list[dict] = []  # requests to the OAuth server listener

        self._token_params = "both"
        self._missing_client_id_error = "invalid_request"
        self.authorize_as_user: int | None = None
        self._redirect_uri: str | None = None
        # How long a "timeout" fault sleeps before answering 503: longer than the app's
        # default read timeout (20 s). Tests set it (or delay_s=) just above theirs.
        self.timeout_delay_s = 30.0
        self.event_timeout_s = 10.0  # read timeout when POSTing events to the app
        # What a refresh of a token of a portal the app was removed from answers: its token
        # was revoked ("invalid_grant"), or, as the OAuth docs also list it, "invalid_client".
        self.not_installed_error = "invalid_grant"
        # Not None: `app.info` answers this `user_id` (any JSON value) instead of the token's.
        self.app_info_user_id: object = None
        self._clock_offset = 0.0
        self._token_failures: list[dict] = []
        # Drip, huge answers, never answering, for the OAuth server: see transport.py.
        self.transport = TransportFaults()
        self._listener: Listener | None = None

    # ---- lifecycle

    def start(self, port: int = 0) -> FakeBitrix:
        if self._listener is None:
            self._listener = Listener(
                lambda req: oauth.handle_server(self, req), self.host, port, name="oauth"
            )
            self._listener.start()
        return self

    def stop(self) -> None:
        for portal in list(self.portals):
            portal.stop()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def __enter__(self) -> FakeBitrix:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- addresses

    def _require_started(self) -> Listener:
        if self._listener is None:
            raise RuntimeError("FakeBitrix is not started: call start() first")
        return self._listener

    @property
    def oauth_url(self) -> str:
        return self._require_started().url

    @property
    def oauth_host(self) -> str:
        """``domain`` of token responses and ``server_domain`` of the authorize redirect."""
        return self._require_started().netloc

    @property
    def server_endpoint(self) -> str:
        return self.oauth_url + "/rest/"

    @property
    def app_url(self) -> str:
        """Where the app lives: default handler URLs and event targets derive from it."""
        return self._app_url

    @app_url.setter
    def app_url(self, value: str) -> None:
        self._app_url = value.rstrip("/")

    @property
    def redirect_uri(self) -> str:
        return self._redirect_uri or self.app_url + "/b24/oauth/callback/"

    @redirect_uri.setter
    def redirect_uri(self, value: str | None) -> None:
        self._redirect_uri = value

    # ---- clock

    def now(self) -> float:
        """The emulator clock: wall time plus ``advance_clock`` offsets. Token,
        code, idempotency and limit expiry all use it."""
        return time.time() + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        with self.lock:
            self._clock_offset += seconds

    # ---- portals

    def add_portal(
        self,
        member_id=None,
        rate_limit=(50, 2.0),
        port=0,
        scopes="task,tasks,placement,user_brief",
        status="F",
        lang="en",
        tz_offset_minutes=180,
    ) -> FakePortal:
        self.start()
        portal = FakePortal(
            self, member_id, rate_limit, port, scopes, status, lang, tz_offset_minutes
        )
        with self.lock:
            self.portals.append(portal)
        return portal

    def portal(self, member_id: str) -> FakePortal:
        with self.lock:
            for portal in self.portals:
                if portal.member_id == member_id:
                    return portal
        raise KeyError(member_id)

    # ---- how the token endpoint reads a request

    @property
    def token_params(self) -> str:
        """Where ``/oauth/token/`` reads its parameters: ``"both"`` (default: the query string
        and a POST body), ``"query"`` (a body is ignored), ``"body"`` (the query string is
        ignored) or ``"get_only"`` (the query string; anything but GET gets 405)."""
        return self._token_params

    @token_params.setter
    def token_params(self, mode: str) -> None:
        if mode not in oauth.TOKEN_PARAMS_MODES:
            raise ValueError(f"token_params must be one of {oauth.TOKEN_PARAMS_MODES}")
        self._token_params = mode

    @property
    def missing_client_id_error(self) -> str:
        """The answer to a token request in which no ``client_id`` was read: the documented
        ``"invalid_request"`` (400, ``No "client_id" parameter found``; default) or
        ``"wrong_client"`` (200, as for an unknown client id)."""
        return self._missing_client_id_error

    @missing_client_id_error.setter
    def missing_client_id_error(self, code: str) -> None:
        if code not in oauth.MISSING_CLIENT_ID_ERRORS:
            raise ValueError(
                f"missing_client_id_error must be one of {oauth.MISSING_CLIENT_ID_ERRORS}"
            )
        self._missing_client_id_error = code

    # ---- faults on the token endpoint

    def fail_token_next(
        self,
        count: int = 1,
        error: str = "timeout",
        status: int | None = None,
        delay_s: float | None = None,
    ) -> None:
        """Queue faults for the next ``count`` calls of ``/oauth/token/``.

        ``"timeout"``: sleep ``delay_s`` (default ``timeout_delay_s``), then 503;
        ``"drop"``: close the connection without processing; ``"lost_response"``:
        process the request (a refresh token IS rotated), then close the
        connection without answering; ``"500"``/``"502"``/``"503"``...: that status
        with an HTML body; any other string: that OAuth error code
        (``invalid_grant``, ``invalid_client``, ``wrong_client`` (HTTP 200),
        ``PAYMENT_REQUIRED`` ...) without processing the request."""
        with self.lock:
            for _ in range(count):
                self._token_failures.append({"error": error, "status": status, "delay_s": delay_s})

    def _pop_token_failure(self) -> dict | None:
        with self.lock:
            return self._token_failures.pop(0) if self._token_failures else None

    def _record_token_call(self, call: dict) -> None:
        with self.lock:
            self.token_calls.append(call)
