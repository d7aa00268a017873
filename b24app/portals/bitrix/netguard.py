"""Trust boundaries for every URL the app sends a token to.

Bitrix24 tells us where to send requests (``client_endpoint`` from the OAuth server, a ``302``
when a portal is renamed). Before a host is trusted with a token it must pass
:func:`check_base_url`: an ``https`` origin with a canonical host name that resolves only to
public addresses. ``B24_ALLOW_PRIVATE_PORTALS`` (``allow_private``) relaxes the address and scheme
rules for on-premise portals on a LAN and for local testing; the syntax rules always apply.

A resolve-time check alone can be defeated by DNS rebinding (the name resolves to a public
address while being checked and to ``127.0.0.1`` when the connection is made), so
:class:`GuardedAdapter` repeats the address check on the socket's real peer right after it
connects and before a single byte of the request is sent.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import NamedTuple
from urllib.parse import urlsplit

import idna
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from b24app.portals.bitrix.errors import UnsafeURL

__all__ = [
    "GuardedAdapter",
    "Origin",
    "address_refusal",
    "check_base_url",
    "client_endpoint_for",
    "parse_origin",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DEFAULT_PORTS = {"https": 443, "http": 80}
# Characters that different URL parsers disagree about; a base URL never needs them.
_AMBIGUOUS_CHARS = re.compile(r"[\\\s\x00-\x1f\x7f]")
# WHATWG "ends in a number": a host whose last label is decimal or 0x-hex is parsed as an IPv4
# address by browsers and many libraries (``2130706433``, ``0x7f.1``, ``017700000001``).
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
# Every address the guard refuses, by network, from the IANA IPv4 and IPv6 Special-Purpose
# Address Registries (plus multicast and the reserved blocks). The interpreter's `is_global` /
# `is_private` are not used: they change between Python versions (3.11 calls the deprecated
# site-local fec0::/10 global). A network here is refused even when IANA marks part of it
# globally reachable (AS112, the 192.0.0.0/24 anycast addresses): no portal lives there.
_REFUSED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(network), label)
    for network, label in (
        ("0.0.0.0/8", "this network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.31.196.0/24", "AS112"),
        ("192.52.193.0/24", "AMT"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("192.175.48.0/24", "AS112 direct delegation"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # 255.255.255.255 (limited broadcast) included
    )
)
_REFUSED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(network), label)
    for network, label in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible"),  # deprecated (RFC 4291); never routed
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("100:0:0:1::/64", "dummy prefix"),
        ("2001::/23", "IETF protocol assignments"),  # Teredo, benchmarking, ORCHID, ...
        ("2001:db8::/32", "documentation"),
        ("2620:4f:8000::/48", "AS112 direct delegation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "SRv6 SIDs"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
# Only 2000::/3 is allocated as global unicast; the rest of the IPv6 space is reserved (the
# special networks above that lie outside it are refused anyway, NAT64 is judged first).
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
# IPv6 forms that carry an IPv4 address the packets really go to: judged by that address.
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# NAT64 well-known prefix (RFC 6052): the last 32 bits are an IPv4 address.
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
_TEREDO = ipaddress.IPv6Network("2001::/32")


class Origin(NamedTuple):
    """A syntactically checked origin; ``str()`` gives ``scheme://host[:port]``."""

    scheme: str
    host: str
    """Lower-case IDNA host name, or a canonical IP literal without brackets."""
    port: int | None
    """``None`` when it is the scheme's default port."""

    def __str__(self) -> str:
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            netloc = f"{netloc}:{self.port}"
        return f"{self.scheme}://{netloc}"


def parse_origin(url: str, *, allow_http: bool) -> Origin:
    """Check the syntax of ``url`` and return its :class:`Origin`; no DNS is used.

    A path and query are allowed and ignored. Raises :class:`UnsafeURL`.
    """
    if not isinstance(url, str) or not url:
        raise UnsafeURL("EMPTY_URL", "no URL given")
    if _AMBIGUOUS_CHARS.search(url):
        raise UnsafeURL(
            "AMBIGUOUS_URL", "URL contains a backslash, whitespace or control character"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL("BAD_URL", f"URL cannot be parsed: {exc}") from exc
    scheme = parts.scheme.lower()
    allowed = ("https", "http") if allow_http else ("https",)
    if scheme not in allowed:
        raise UnsafeURL("SCHEME_NOT_ALLOWED", f"scheme {scheme or '(none)'!r} is not allowed")
    if "@" in parts.netloc:
        raise UnsafeURL("USERINFO_NOT_ALLOWED", "URL must not contain user information")
    if "#" in url:
        raise UnsafeURL("FRAGMENT_NOT_ALLOWED", "URL must not contain a fragment")
    if port == 0:
        raise UnsafeURL("BAD_PORT", "port 0 is not allowed")
    host = _canonical_host(parts.hostname or "")
    return Origin(scheme, host, None if port == _DEFAULT_PORTS[scheme] else port)


def check_base_url(url: str, *, allow_private: bool) -> str:
    """Return the normalised origin (``scheme://host[:port]``) of ``url`` if it may get a token.

    Without ``allow_private`` the scheme must be ``https`` and every address the host resolves to
    must be public (see :func:`address_refusal`). With it, ``http`` and any address are accepted
    and no DNS lookup is made. Raises :class:`UnsafeURL` with a code and a readable reason.
    """
    origin = parse_origin(url, allow_http=allow_private)
    if not allow_private:
        _require_public_host(origin.host, origin.port or _DEFAULT_PORTS[origin.scheme])
    return str(origin)


def client_endpoint_for(base_origin: str) -> str:
    """Portal REST root (``client_endpoint``) for an origin returned by :func:`check_base_url`."""
    return base_origin.rstrip("/") + "/rest/"


def address_refusal(address: IPAddress) -> str | None:
    """Why ``address`` must not get a request, or ``None`` when it is a public unicast address.

    Judged against explicit lists of networks (``_REFUSED_V4``, ``_REFUSED_V6``; IPv6 outside
    ``2000::/3`` is reserved). IPv6 forms that carry an IPv4 address (IPv4-mapped, 6to4, NAT64)
    are judged by that address, and Teredo tunnels are refused outright because their client
    address is obfuscated.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return _network_refusal(address, _REFUSED_V4)
    if address in _TEREDO:
        return "Teredo tunnel"
    embedded = address.ipv4_mapped or address.sixtofour or _nat64_embedded(address)
    if embedded is not None:
        reason = address_refusal(embedded)
        if reason is not None:
            return f"{reason} via embedded IPv4 {embedded}"
        if address in _IPV4_MAPPED or address in _NAT64_PREFIX:
            return None  # the packets go to that public IPv4 address
    reason = _network_refusal(address, _REFUSED_V6)
    if reason is None and address not in _GLOBAL_UNICAST_V6:
        reason = "reserved"
    return reason


def _network_refusal(address: IPAddress, networks) -> str | None:
    for network, label in networks:
        if address in network:
            return f"{label} {network}"
    return None


def _nat64_embedded(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _canonical_host(raw_host: str) -> str:
    """Lower-case IDNA host name or canonical IP literal; refuses odd numeric spellings."""
    if not raw_host:
        raise UnsafeURL("HOST_MISSING", "URL has no host")
    if ":" in raw_host:  # urlsplit strips the brackets of an IPv6 literal
        if "%" in raw_host:
            raise UnsafeURL("BAD_HOST", "IPv6 zone identifiers are not allowed")
        try:
            return ipaddress.IPv6Address(raw_host).compressed
        except ValueError as exc:
            raise UnsafeURL("BAD_HOST", f"invalid IPv6 literal {raw_host!r}") from exc
    try:
        host = idna.encode(raw_host.rstrip("."), uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise UnsafeURL("BAD_HOST", f"host {raw_host!r} is not a valid domain name") from exc
    if _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]):
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            address = None
        if address is None or str(address) != host:
            raise UnsafeURL("NUMERIC_HOST", f"non-canonical numeric host {raw_host!r}")
    return host


def _require_public_host(host: str, port: int) -> None:
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: set[IPAddress] = {literal}
    elif host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
        raise UnsafeURL("PRIVATE_ADDRESS", f"host {host!r} is loopback")
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise UnsafeURL("UNRESOLVABLE_HOST", f"host {host!r} does not resolve") from exc
        addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
        if not addresses:
            raise UnsafeURL("UNRESOLVABLE_HOST", f"host {host!r} has no addresses")
    for address in sorted(addresses, key=str):
        reason = address_refusal(address)
        if reason is not None:
            raise UnsafeURL("PRIVATE_ADDRESS", f"host {host!r} resolves to {address} ({reason})")


# --- connect-time check -----------------------------------------------------------------------


class _PeerCheckMixin:
    """Refuses the freshly connected socket when its peer is not a public address."""

    host: str

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        peer = ipaddress.ip_address(sock.getpeername()[0])
        reason = address_refusal(peer)
        if reason is not None:
            sock.close()
            raise UnsafeURL(
                "PRIVATE_ADDRESS",
                f"refused to talk to {self.host!r}: connected to {peer} ({reason})",
            )
        return sock


class _GuardedHTTPConnection(_PeerCheckMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_PeerCheckMixin, HTTPSConnection):
    pass


class _GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """``requests`` adapter that refuses connections whose peer is not a public address.

    The check runs on the connected socket before TLS and before the request is written, so it
    holds even when DNS changes between :func:`check_base_url` and the connection. Mount it for
    ``https://`` and ``http://`` when ``allow_private`` is off. Through an HTTP proxy the peer is
    the proxy, so this check does not apply there; the resolve-time check still does.
    """

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPConnectionPool,
            "https": _GuardedHTTPSConnectionPool,
        }
