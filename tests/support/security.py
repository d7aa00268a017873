"""Helpers of the security suite (its fixtures are in tests/security/conftest.py): a canary that
counts every connection made to it, a record of every outbound `socket.connect` the process
attempts, and a snapshot of the app's rows.

The canary listens on one port on every loopback and non-public address of this machine it can
bind (127.0.0.1, other 127/8 addresses, ::1, and the machine's own private, documentation or ULA
addresses such as 192.0.2.2 or fd00::2 on a CI runner). Addresses without a listener here
(10/8, 169.254.169.254, fe80::…) cannot count connections, so the suite also records every
`socket.connect` through Python's audit hook `socket.connect` (a real hook of the interpreter,
not a mock): a refusal must happen before any connect is attempted, not after a timeout.
"""

from __future__ import annotations

import ipaddress
import selectors
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from b24app.portals.bitrix.netguard import address_refusal

CANARY_CANDIDATES = ("127.0.0.1", "127.0.0.2", "127.1.2.3", "127.255.255.254", "::1")
ACCEPT_READ_TIMEOUT_S = 0.5
MAX_CANARY_PORT_TRIES = 20
PUBLIC_OAUTH = "https://oauth.bitrix24.invalid"
"""The allow-listed OAuth server when a test runs the app in its production setting:
public-looking, and never resolving (RFC 2606 `.invalid`), so nothing leaves this machine."""


def local_non_public_addresses() -> list[str]:
    """This machine's own interface addresses that are not public (Linux /proc)."""
    found: set[str] = set()
    fib_trie = Path("/proc/net/fib_trie")
    if fib_trie.exists():
        lines = fib_trie.read_text().splitlines()
        for previous, line in zip(lines, lines[1:], strict=False):
            if "/32 host LOCAL" in line and "|--" in previous:
                found.add(previous.split("|--")[1].strip())
    if_inet6 = Path("/proc/net/if_inet6")
    if if_inet6.exists():
        for line in if_inet6.read_text().splitlines():
            raw, scope = line.split()[0], line.split()[3]
            if scope == "00":  # global scope (ULA included); link-local needs a zone id
                found.add(str(ipaddress.IPv6Address(int(raw, 16))))
    return sorted(a for a in found if address_refusal(ipaddress.ip_address(a)) is not None)


@dataclass
class Canary:
    """TCP listeners on one port that record every connection they accept and what it sent."""

    port: int = 0
    addresses: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    """The listener address of each connection, as soon as it is accepted."""
    connections: list[tuple[str, int]] = field(default_factory=list)
    """(listener address, bytes received) of each connection once it has closed or gone quiet."""
    _sockets: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Canary:
        candidates = [*CANARY_CANDIDATES, *local_non_public_addresses()]
        for _ in range(MAX_CANARY_PORT_TRIES):
            first = self._listen("127.0.0.1", 0)
            self.port = first.getsockname()[1]
            self._sockets, self.addresses = [first], ["127.0.0.1"]
            for address in dict.fromkeys(candidates):
                if address == "127.0.0.1":
                    continue
                try:
                    self._sockets.append(self._listen(address, self.port))
                    self.addresses.append(address)
                except OSError:
                    continue  # not on this machine, or the port is taken there: try the next
            if "::1" in self.addresses or not socket.has_ipv6:
                break
            self._close()  # the port was taken on ::1: pick another one for all
        self._thread = threading.Thread(target=self._serve, name="canary", daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _listen(address: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((address, port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in self._sockets:
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.1):
                    try:
                        conn, _peer = key.fileobj.accept()
                    except OSError:
                        continue
                    self._drain(conn, key.fileobj.getsockname()[0])

    def _drain(self, conn: socket.socket, address: str) -> None:
        """Record the connection at once, then count what it sends until it closes or falls
        silent."""
        self.accepted.append(address)
        received = 0
        conn.settimeout(ACCEPT_READ_TIMEOUT_S)
        try:
            while chunk := conn.recv(65536):
                received += len(chunk)
        except OSError:
            pass
        finally:
            conn.close()
        self.connections.append((address, received))

    def _close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close()


# --- every socket.connect the process attempts --------------------------------------------------

_recording: list[list[tuple[str, int]]] = []
_recording_lock = threading.Lock()


def _audit(event: str, args: tuple) -> None:
    if event != "socket.connect" or not _recording:
        return
    address = args[1]
    if isinstance(address, tuple) and len(address) >= 2:
        with _recording_lock:
            for record in _recording:
                record.append((str(address[0]), int(address[1])))


_hook_installed = False


def _install_hook() -> None:
    """Audit hooks cannot be removed, so one hook is installed once and records only while a
    `connects` block is open."""
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True


def _service_endpoints() -> set[tuple[str, int]]:
    """Where the app may connect in these tests: its own PostgreSQL and Redis."""
    from django.conf import settings

    endpoints = set()
    database = settings.DATABASES["default"]
    if database.get("HOST"):
        endpoints.add((database["HOST"], int(database.get("PORT") or 5432)))
    for url in (settings.REDIS_URL, settings.CELERY_BROKER_URL):
        if url.startswith(("redis://", "rediss://")):
            parts = urlsplit(url)
            endpoints.add((parts.hostname or "localhost", parts.port or 6379))
    resolved = set()
    for host, port in endpoints:
        for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            resolved.add((info[4][0], port))
    return resolved


@contextmanager
def connects() -> Iterator[list[tuple[str, int]]]:
    """Record every `socket.connect` made inside the block, except to PostgreSQL and Redis."""
    _install_hook()
    allowed = _service_endpoints()
    seen: list[tuple[str, int]] = []
    with _recording_lock:
        _recording.append(seen)
    outbound: list[tuple[str, int]] = []
    try:
        yield outbound
    finally:
        with _recording_lock:
            _recording.remove(seen)
        outbound.extend(address for address in seen if address not in allowed)


def db_snapshot() -> dict:
    """Every row the app keeps about portals, people, events and changes."""
    from b24app.portals.models import Account, EventReceipt, Portal
    from results.models import ResultChange

    return {
        model.__name__: list(model.objects.order_by("pk").values())
        for model in (Portal, Account, EventReceipt, ResultChange)
    }
