"""SSRF guard: URL syntax, resolved addresses and the connect-time peer check."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import requests

from b24app.portals.bitrix import BitrixError, UnsafeURL
from b24app.portals.bitrix.netguard import (
    GuardedAdapter,
    address_refusal,
    check_base_url,
    client_endpoint_for,
)

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"

FAKE_DNS: dict[str, list[str]] = {
    "portal.bitrix24.com": [PUBLIC_V4, PUBLIC_V6],
    "xn--e1afmkfd.xn--p1ai": [PUBLIC_V4],
    "internal.example": ["10.1.2.3"],
    "metadata.example": ["169.254.169.254"],
    "mixed.example": [PUBLIC_V4, "192.168.0.10"],
    "v6loop.example": ["::1"],
}


def _fake_getaddrinfo(table: dict[str, list[str]]) -> Callable[..., list[tuple]]:
    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002
        try:
            addresses = [str(ipaddress.ip_address(host))]  # literals resolve to themselves
        except ValueError:
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
            addresses = table[host]
        infos = []
        for address in addresses:
            if ipaddress.ip_address(address).version == 6:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return infos

    return getaddrinfo


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here uses real DNS."""
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo(FAKE_DNS))


SSRF_CORPUS = [
    # loopback, unspecified, link-local, private, CGNAT, multicast, broadcast
    ("https://127.0.0.1/", "PRIVATE_ADDRESS"),
    ("https://127.8.9.10/rest/", "PRIVATE_ADDRESS"),
    ("https://[::1]/", "PRIVATE_ADDRESS"),
    ("https://0.0.0.0/", "PRIVATE_ADDRESS"),
    ("https://[::]/", "PRIVATE_ADDRESS"),
    ("https://169.254.169.254/latest/meta-data/", "PRIVATE_ADDRESS"),
    ("https://[fe80::1]/", "PRIVATE_ADDRESS"),
    ("https://10.0.0.1/", "PRIVATE_ADDRESS"),
    ("https://172.16.0.1/", "PRIVATE_ADDRESS"),
    ("https://172.31.255.254/", "PRIVATE_ADDRESS"),
    ("https://192.168.1.1/", "PRIVATE_ADDRESS"),
    ("https://100.64.0.1/", "PRIVATE_ADDRESS"),
    ("https://224.0.0.1/", "PRIVATE_ADDRESS"),
    ("https://255.255.255.255/", "PRIVATE_ADDRESS"),
    ("https://[fc00::1]/", "PRIVATE_ADDRESS"),
    ("https://[fd12:3456:789a::1]/", "PRIVATE_ADDRESS"),
    ("https://[ff02::1]/", "PRIVATE_ADDRESS"),
    # IPv6 forms that embed a private IPv4 address
    ("https://[::ffff:127.0.0.1]/", "PRIVATE_ADDRESS"),
    ("https://[::ffff:7f00:1]/", "PRIVATE_ADDRESS"),
    ("https://[::ffff:10.0.0.1]/", "PRIVATE_ADDRESS"),
    ("https://[2002:7f00:1::]/", "PRIVATE_ADDRESS"),  # 6to4 of 127.0.0.1
    ("https://[2002:a9fe:a9fe::]/", "PRIVATE_ADDRESS"),  # 6to4 of 169.254.169.254
    ("https://[64:ff9b::a00:1]/", "PRIVATE_ADDRESS"),  # NAT64 of 10.0.0.1
    ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "PRIVATE_ADDRESS"),  # Teredo
    ("https://[::127.0.0.1]/", "PRIVATE_ADDRESS"),  # IPv4-compatible (deprecated)
    # odd numeric spellings of 127.0.0.1
    ("https://2130706433/", "NUMERIC_HOST"),
    ("https://0x7f000001/", "NUMERIC_HOST"),
    ("https://0x7f.1/", "NUMERIC_HOST"),
    ("https://017700000001/", "NUMERIC_HOST"),
    ("https://0177.0.0.1/", "NUMERIC_HOST"),
    ("https://127.1/", "NUMERIC_HOST"),
    ("https://127.0.0.1./", "PRIVATE_ADDRESS"),
    ("https://0/", "NUMERIC_HOST"),
    ("https://example.123/", "NUMERIC_HOST"),
    ("https://１２７．０．０．１/", "PRIVATE_ADDRESS"),  # full-width digits normalise to 127.0.0.1
    # names
    ("https://localhost/", "PRIVATE_ADDRESS"),
    ("https://LOCALHOST./", "PRIVATE_ADDRESS"),
    ("https://api.localhost/", "PRIVATE_ADDRESS"),
    ("https://internal.example/", "PRIVATE_ADDRESS"),
    ("https://metadata.example/", "PRIVATE_ADDRESS"),
    ("https://mixed.example/", "PRIVATE_ADDRESS"),  # ANY private address refuses
    ("https://v6loop.example/", "PRIVATE_ADDRESS"),
    ("https://does-not-resolve.example/", "UNRESOLVABLE_HOST"),
    # user information and parser confusion
    ("https://a@b.example/", "USERINFO_NOT_ALLOWED"),
    ("https://user:pw@portal.bitrix24.com/", "USERINFO_NOT_ALLOWED"),
    ("https://portal.bitrix24.com@127.0.0.1/", "USERINFO_NOT_ALLOWED"),
    ("https://portal.bitrix24.com#@127.0.0.1/", "FRAGMENT_NOT_ALLOWED"),
    ("https://portal.bitrix24.com/#x", "FRAGMENT_NOT_ALLOWED"),
    ("https://127.0.0.1\\@portal.bitrix24.com/", "AMBIGUOUS_URL"),
    ("https://portal.bitrix24.com\t.evil/", "AMBIGUOUS_URL"),
    ("https://portal.bitrix24.com /", "AMBIGUOUS_URL"),
    ("https://portal.bitrix24.com\r\nHost: x/", "AMBIGUOUS_URL"),
    ("https://por_tal.example/", "BAD_HOST"),
    ("https://[::1%25eth0]/", "BAD_HOST"),
    ("https:///rest/", "HOST_MISSING"),
    # ports
    ("https://portal.bitrix24.com:0/", "BAD_PORT"),
    ("https://portal.bitrix24.com:99999/", "BAD_URL"),
    ("https://portal.bitrix24.com:abc/", "BAD_URL"),
    # schemes
    ("http://portal.bitrix24.com/", "SCHEME_NOT_ALLOWED"),
    ("ftp://portal.bitrix24.com/", "SCHEME_NOT_ALLOWED"),
    ("file:///etc/passwd", "SCHEME_NOT_ALLOWED"),
    ("gopher://portal.bitrix24.com:70/", "SCHEME_NOT_ALLOWED"),
    ("javascript:alert(1)", "SCHEME_NOT_ALLOWED"),
    ("//portal.bitrix24.com/", "SCHEME_NOT_ALLOWED"),
    ("portal.bitrix24.com", "SCHEME_NOT_ALLOWED"),
    ("", "EMPTY_URL"),
]


@pytest.mark.parametrize(("url", "code"), SSRF_CORPUS)
def test_check_base_url_refuses_unsafe_urls(url: str, code: str) -> None:
    with pytest.raises(UnsafeURL) as caught:
        check_base_url(url, allow_private=False)
    assert caught.value.code == code
    assert caught.value.description  # a readable reason


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://portal.bitrix24.com/rest/", "https://portal.bitrix24.com"),
        ("https://PORTAL.Bitrix24.COM:443", "https://portal.bitrix24.com"),
        ("https://portal.bitrix24.com.:8443/x?y=1", "https://portal.bitrix24.com:8443"),
        ("https://пример.рф/rest/", "https://xn--e1afmkfd.xn--p1ai"),
        (f"https://{PUBLIC_V4}/", f"https://{PUBLIC_V4}"),
        (f"https://[{PUBLIC_V6.upper()}]/rest/", f"https://[{PUBLIC_V6}]"),
    ],
)
def test_check_base_url_accepts_public_urls(url: str, origin: str) -> None:
    assert check_base_url(url, allow_private=False) == origin


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://127.0.0.1/", "https://127.0.0.1"),
        ("http://127.0.0.1:8000/rest/", "http://127.0.0.1:8000"),
        ("http://localhost:8000", "http://localhost:8000"),
        ("https://[::1]:8443/", "https://[::1]:8443"),
        ("http://10.0.0.5/", "http://10.0.0.5"),
        ("https://internal.example/", "https://internal.example"),
        ("http://portal.bitrix24.com:80/", "http://portal.bitrix24.com"),
    ],
)
def test_check_base_url_allow_private_accepts_lan_and_loopback(url: str, origin: str) -> None:
    assert check_base_url(url, allow_private=True) == origin


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://2130706433/", "NUMERIC_HOST"),
        ("http://0x7f.1/", "NUMERIC_HOST"),
        ("http://a@127.0.0.1/", "USERINFO_NOT_ALLOWED"),
        ("ftp://127.0.0.1/", "SCHEME_NOT_ALLOWED"),
    ],
)
def test_check_base_url_allow_private_still_refuses_bad_syntax(url: str, code: str) -> None:
    with pytest.raises(UnsafeURL) as caught:
        check_base_url(url, allow_private=True)
    assert caught.value.code == code


def test_unsafe_url_is_a_bitrix_error() -> None:
    with pytest.raises(BitrixError):
        check_base_url("https://10.0.0.1/", allow_private=False)


def test_client_endpoint_for_appends_rest_root() -> None:
    assert client_endpoint_for("https://portal.bitrix24.com") == "https://portal.bitrix24.com/rest/"


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", False),
        (PUBLIC_V6, False),
        ("2002:808:808::", False),  # 6to4 of a public address
        ("::ffff:127.0.0.1", True),
        ("198.18.0.1", True),  # benchmarking range, not global
    ],
)
def test_address_refusal_judges_embedded_and_special_ranges(address: str, refused: bool) -> None:
    assert (address_refusal(ipaddress.ip_address(address)) is not None) is refused


# --- GuardedAdapter: the connect-time check --------------------------------------------------


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, type[_CountingHandler]]]:
    handler = type("Handler", (_CountingHandler,), {"hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _guarded_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", GuardedAdapter())
    session.mount("https://", GuardedAdapter())
    return session


def test_guarded_adapter_refuses_loopback_peer_before_sending(loopback_server) -> None:
    port, handler = loopback_server
    plain = requests.Session()
    plain.trust_env = False
    assert plain.get(f"http://127.0.0.1:{port}/", timeout=5).text == "ok"  # server works
    assert handler.hits == 1

    with pytest.raises(UnsafeURL) as caught:
        _guarded_session().get(f"http://127.0.0.1:{port}/", timeout=5)

    assert caught.value.code == "PRIVATE_ADDRESS"
    assert handler.hits == 1  # the guarded request never reached the server


def test_guarded_adapter_defeats_dns_rebinding(loopback_server, monkeypatch) -> None:
    port, handler = loopback_server
    answers = iter([[PUBLIC_V4], ["127.0.0.1"]])
    real = _fake_getaddrinfo({})

    def rebinding_getaddrinfo(host, port_, *args, **kwargs):
        if host != "rebind.example":
            return real(host, port_, *args, **kwargs)
        return _fake_getaddrinfo({host: next(answers)})(host, port_, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    # The resolve-time check sees a public address ...
    assert check_base_url("https://rebind.example/", allow_private=False)
    # ... but the connection lands on loopback and is refused at connect time.
    with pytest.raises(UnsafeURL):
        _guarded_session().get(f"http://rebind.example:{port}/", timeout=5)
    assert handler.hits == 0


# --- the refused networks, listed here independently of netguard's own list -------------------

# IANA IPv4 and IPv6 Special-Purpose Address Registries, multicast and the reserved blocks.
# Each network's first and last address must be refused, whatever the interpreter's
# `is_global` says (Python 3.11 calls fec0::/10, 3fff::/20 and 5f00::/16 global).
REFUSED_NETWORKS = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.31.196.0/24",
    "192.52.193.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "192.175.48.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::/96",  # IPv4-compatible
    "64:ff9b:1::/48",  # local-use NAT64
    "100::/64",  # discard-only
    "100:0:0:1::/64",  # dummy prefix
    "2001::/23",  # IETF protocol assignments (Teredo 2001::/32, benchmarking 2001:2::/48, ORCHID)
    "2001:db8::/32",
    "2620:4f:8000::/48",
    "3fff::/20",
    "5f00::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
    # reserved IPv6 space outside 2000::/3 (global unicast)
    "4000::/3",
    "8000::/3",
    "e000::/4",
]


def _edges(network: str) -> list[str]:
    net = ipaddress.ip_network(network)
    return [str(net.network_address), str(net.broadcast_address)]


@pytest.mark.parametrize(
    "address", [address for network in REFUSED_NETWORKS for address in _edges(network)]
)
def test_address_refusal_refuses_every_special_purpose_network(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address",
    [
        "fec0::1",  # deprecated site-local: "global" to Python 3.11
        "feff:ffff::1",
        "3fff:fff:ffff::1",  # documentation (RFC 9637)
        "5f00::1",  # SRv6
        "::ffff:192.168.1.1",  # IPv4-mapped private
        "::ffff:100.64.0.1",  # IPv4-mapped CGNAT
        "64:ff9b::c0a8:101",  # NAT64 of 192.168.1.1
        "64:ff9b::c612:1",  # NAT64 of 198.18.0.1 (benchmarking)
        "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
        "2002:6440:1::1",  # 6to4 of 100.64.0.1
        "2002:c000:201::1",  # 6to4 of 192.0.2.1 (documentation)
        "2001:0:c0a8:101::1",  # Teredo
    ],
)
def test_address_refusal_refuses_site_local_and_private_ipv4_embedded_in_ipv6(address) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address",
    [
        "1.1.1.1",
        "9.255.255.255",  # next to 10/8
        "11.0.0.0",
        "100.63.255.255",  # next to 100.64/10
        "100.128.0.0",
        "126.255.255.255",  # next to 127/8
        "172.15.255.255",  # next to 172.16/12
        "172.32.0.0",
        "192.0.1.1",
        "192.167.255.255",
        "198.17.255.255",  # next to 198.18/15
        "198.20.0.0",
        "223.255.255.255",  # next to 224/4
        PUBLIC_V4,
        PUBLIC_V6,
        "2a00:1450:4001:80b::200e",
        "2001:200::1",  # the first real allocation after the IETF block
        "2001:db7:ffff::1",
        "2002:808:808::1",  # 6to4 of a public address
        "64:ff9b::808:808",  # NAT64 of a public address
        "::ffff:8.8.8.8",  # IPv4-mapped public: the packets go to 8.8.8.8
        "3fff:1000::1",  # just past 3fff::/20
    ],
)
def test_address_refusal_lets_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_check_base_url_refuses_site_local_ipv6() -> None:
    with pytest.raises(UnsafeURL) as caught:
        check_base_url("https://[fec0::1]/rest/", allow_private=False)
    assert caught.value.code == "PRIVATE_ADDRESS"
    assert "site-local" in caught.value.description
