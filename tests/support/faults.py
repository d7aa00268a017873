"""Parts for the fault suite: a TCP proxy that can make PostgreSQL look restarted, the app
served by gunicorn as in production, and a client for it shaped like Django's test client (so
the helpers of tests/support/results.py drive it unchanged)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import requests

from tests.appserver import LOOPBACK, AppServer, free_port


class TcpProxy:
    """Forwards a loopback port to `target`, one pair of threads per connection.

    What a database restart looks like to its clients: `drop_all` cuts every open connection,
    after `stop_accepting` new ones are refused (nothing listens on the port), and `start`
    accepts again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.connections_made = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        listener.settimeout(0.1)  # lets `stop_accepting` end the loop without a wake-up call
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept, args=(listener,), name=f"tcp-proxy-{self.port}", daemon=True
        )
        self._acceptor.start()
        return self

    def stop_accepting(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            self._acceptor.join()

    def drop_all(self) -> None:
        """Cut every open connection, both ways."""
        with self._lock:
            open_sockets, self._sockets = self._sockets, set()
        for sock in open_sockets:
            _close(sock)

    def stop(self) -> None:
        self.stop_accepting()
        self.drop_all()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop_accepting
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
                self.connections_made += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:  # one side ended: end the other too, as a dropped connection does
            with self._lock:
                self._sockets -= {source, sink}
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def start_web(env: dict[str, str], folder: Path, threads: int) -> AppServer:
    """The app under gunicorn as in production (`tests.appserver`), one gthread worker of
    `threads` threads, in a process group of its own, its log (access lines too) and its
    collected static files in `folder`; `B24_APP_URL` is its address. Returned once `/healthz`
    answers at all."""
    from django.core.management import call_command
    from django.test import override_settings

    static_root = folder / "static"
    with override_settings(STATIC_ROOT=static_root):  # collected as at a deployment
        call_command("collectstatic", interactive=False, verbosity=0)
    web = AppServer(
        folder / "web.log", workers=1, threads=threads, access_log="-", new_session=True
    )
    web.start({**env, "B24_APP_URL": web.url, "DJANGO_STATIC_ROOT": str(static_root)})
    try:
        web.wait_ready(60)
    except BaseException:
        web.stop()
        raise
    return web


class LiveClient:
    """`get`/`post` like Django's test client (`HTTP_*` keyword arguments are headers), over
    real HTTP to a running server; answers are `requests` responses (`status_code`, `content`).
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = requests.Session()

    def get(self, path: str, **extra):
        return self.session.get(self.base_url + path, headers=_headers(extra), timeout=30)

    def post(self, path: str, data=None, content_type: str | None = None, **extra):
        headers = _headers(extra)
        if content_type is not None:
            headers["Content-Type"] = content_type
        return self.session.post(self.base_url + path, data=data or {}, headers=headers, timeout=30)


def _headers(extra: dict) -> dict[str, str]:
    """Django's `HTTP_X_FRAME_TOKEN` spelling to the header `X-Frame-Token`."""
    return {
        name.removeprefix("HTTP_").replace("_", "-").title(): value
        for name, value in extra.items()
        if name.startswith("HTTP_")
    }
