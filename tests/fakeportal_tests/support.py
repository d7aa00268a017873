"""Helpers for the emulator's own tests: HTTP calls and a tiny stdlib app server."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import requests

CLIENT_ID = "app.fake0000000001.00000001"
CLIENT_SECRET = "fake-secret-for-the-emulator-tests"
TIMEOUT = 5

P = "BITRIX_REST_V3_EXCEPTION_"
REQUEST_VALIDATION = P + "VALIDATION_REQUESTVALIDATIONEXCEPTION"
DTO_VALIDATION = P + "VALIDATION_DTOVALIDATIONEXCEPTION"
UNKNOWN_DTO_PROPERTY = P + "UNKNOWNDTOPROPERTYEXCEPTION"
ACCESS_DENIED = P + "ACCESSDENIEDEXCEPTION"


def v3(portal, method, auth, headers=None, **body):
    payload = {"auth": auth, **body} if auth is not None else body
    return requests.post(
        f"{portal.url}/rest/api/{method}",
        json=payload,
        headers=headers,
        timeout=TIMEOUT,
        allow_redirects=False,
    )


def classic(portal, method, auth=None, **params):
    payload = {"auth": auth, **params} if auth is not None else params
    return requests.post(
        f"{portal.url}/rest/{method}.json", json=payload, timeout=TIMEOUT, allow_redirects=False
    )


def token_request(fake, method="POST", **params):
    data = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **params}
    data = {k: v for k, v in data.items() if v is not None}
    url = fake.oauth_url + "/oauth/token/"
    if method == "GET":
        return requests.get(url, params=data, timeout=TIMEOUT)
    return requests.post(url, data=data, timeout=TIMEOUT)


def refresh(fake, refresh_token, **extra):
    return token_request(fake, grant_type="refresh_token", refresh_token=refresh_token, **extra)


class AppCatcher:
    """A stand-in for the app: records every request and answers from ``routes``
    (path -> (status, body, content type)), 200 "ok" otherwise."""

    def __init__(self):
        self.requests: list[dict] = []
        self.routes: dict[str, tuple[int, str, str]] = {}
        self.lock = threading.Lock()
        catcher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                with catcher.lock:
                    catcher.requests.append(
                        {
                            "method": self.command,
                            "path": parts.path,
                            "query": parts.query,
                            "headers": dict(self.headers.items()),
                            "body": body,
                        }
                    )
                status, text, ctype = catcher.routes.get(parts.path, (200, "ok", "text/plain"))
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def posts(self, path):
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST" and r["path"] == path]

    @staticmethod
    def pairs(request) -> list[tuple[str, str]]:
        return parse_qsl(request["body"].decode(), keep_blank_values=True)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def catcher_pairs_dict(catcher, path="/b24/events/") -> dict:
    """The decoded body of the last POST the app got on ``path``."""
    return dict(catcher.pairs(catcher.posts(path)[-1]))
