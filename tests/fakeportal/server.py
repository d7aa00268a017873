"""HTTP plumbing: a threaded listener on 127.0.0.1 that hands every request to
an ``app(Request) -> Response`` callable.

A listener can be stopped and started again on the same port (``go_down`` /
``come_back``); stopping also cuts open keep-alive connections so clients see
"connection refused"/"reset" rather than being served by a lingering thread.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from .util import Headers, parse_php_pairs

log = logging.getLogger("fakeportal")

# Returned by an app to close the connection without writing any response.
DROP = object()


@dataclass
class Request:
    method: str
    target: str  # raw request target: path + "?" + query
    path: str
    query_string: str
    headers: Headers
    body: bytes
    client_ip: str

    @property
    def query_pairs(self) -> list[tuple[str, str]]:
        return parse_qsl(self.query_string, keep_blank_values=True)

    @property
    def query(self) -> dict:
        """PHP-style parsed query string (bracket keys nest)."""
        return parse_php_pairs(self.query_pairs)

    @property
    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def form(self) -> dict:
        return parse_php_pairs(
            parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        )

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def parsed_body(self):
        """Best-effort parsed body for recording: JSON, form, or None."""
        if not self.body:
            return None
        ctype = self.content_type
        try:
            if "json" in ctype:
                return self.json()
            if ctype in ("application/x-www-form-urlencoded", ""):
                return self.form()
        except (ValueError, UnicodeDecodeError):
            return None
        return None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    # How the body travels (transport switches, see transport.py): `drip_s` writes it one byte
    # at a time with that pause between bytes; `stream` (with `stream_length`, or chunked
    # without) produces it piece by piece instead of `body`; `on_sent(bytes, complete)` learns
    # how much of it the client took before it went away.
    drip_s: float | None = None
    stream: Callable[[], Iterable[bytes]] | None = None
    stream_length: int | None = None
    on_sent: Callable[[int, bool], None] | None = None

    @classmethod
    def json(cls, payload, status: int = 200, headers=None) -> Response:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        hdrs = [("Content-Type", "application/json; charset=utf-8")]
        hdrs.extend(headers or [])
        return cls(status, data, hdrs)

    @classmethod
    def html(cls, text: str, status: int = 200, headers=None) -> Response:
        hdrs = [("Content-Type", "text/html; charset=utf-8")]
        hdrs.extend(headers or [])
        return cls(status, text.encode("utf-8"), hdrs)

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Response:
        from html import escape

        body = (
            "<!DOCTYPE html><html><head><title>302 Found</title></head><body>"
            f'<h1>Found</h1><p>The document has moved <a href="{escape(location)}">here</a>.</p>'
            "</body></html>"
        )
        return cls.html(body, status, headers=[("Location", location)])

    def header(self, name: str):
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json_body(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except ValueError:
            return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a handler sleeping in a "timeout"
    request_queue_size = 512  # 50+ concurrent clients must not overflow the backlog
    allow_reuse_address = True

    def __init__(self, addr, handler, listener: Listener):
        self.listener = listener
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(addr, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without TCP_NODELAY the body waits ~40 ms for the
    # client's delayed ACK on every keep-alive request.
    disable_nagle_algorithm = True
    server_version = "FakeBitrix24/1.0"
    sys_version = ""

    def setup(self):
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        log.debug("%s %s", self.address_string(), format % args)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self):
        listener: Listener = self.server.listener
        if listener.down:
            self._drop()
            return
        body = self._read_body()
        parts = urlsplit(self.path)
        headers = Headers()
        for key, value in self.headers.items():
            headers[key] = value
        req = Request(
            method=self.command,
            target=self.path,
            path=parts.path,
            query_string=parts.query,
            headers=headers,
            body=body,
            client_ip=self.client_address[0],
        )
        try:
            resp = listener.app(req)
        except Exception:  # pragma: no cover - a bug in the emulator; keep serving
            log.exception("fakeportal: unhandled error for %s %s", self.command, self.path)
            resp = Response.json(
                {"error": "INTERNAL_SERVER_ERROR", "error_description": "Internal server error"},
                500,
            )
        if resp is DROP or listener.down:
            self._drop()
            return
        sent, complete = 0, False
        try:
            self.send_response(resp.status)
            for key, value in resp.headers:
                self.send_header(key, value)
            chunked = resp.stream is not None and resp.stream_length is None
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                length = len(resp.body) if resp.stream is None else resp.stream_length
                self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.flush()
            if self.command != "HEAD":
                pieces = [resp.body] if resp.stream is None else resp.stream()
                for piece in pieces:
                    if resp.drip_s is not None:
                        for index in range(len(piece)):
                            if listener.down:
                                raise ConnectionResetError("listener stopped")
                            time.sleep(resp.drip_s)
                            self._write(piece[index : index + 1], chunked)
                            sent += 1
                    elif piece:
                        self._write(piece, chunked)
                        sent += len(piece)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            complete = True
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            if resp.on_sent is not None:
                resp.on_sent(sent, complete)

    def _write(self, data: bytes, chunked: bool) -> None:
        if chunked:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        else:
            self.wfile.write(data)
        self.wfile.flush()

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class Listener:
    """One TCP listener on ``host:port`` serving ``app``. Restartable on the same port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, name: str = "listener"):
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self.down = True
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Listener:
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), _Handler, self)
        self.port = server.server_address[1]
        self._server = server
        self.down = False
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakeportal-{self.name}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self.down = True
        # shutdown() waits for the serve loop's next poll; a throw-away connection
        # wakes its selector at once, so stopping takes milliseconds.
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        try:
            socket.create_connection((self.host, self.port), timeout=0.2).close()
        except OSError:
            pass
        stopper.join()
        server.server_close()
        with server.connections_lock:
            conns = list(server.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server = None
        self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None
