"""SSRF: every place a host or URL enters the app, fed a corpus of loopback, private, link-local
and odd spellings aimed at a canary, with the app in its production setting
(`B24_ALLOW_PRIVATE_PORTALS=false`). Each request must be refused with a clear answer, change
nothing, and make no connection: the canary accepts none, and no `socket.connect` outside
PostgreSQL and Redis is even attempted (so private addresses without a listener are covered too).

Where hosts enter: the install POST (`DOMAIN` in the query, `SERVER_ENDPOINT`), the placement POST
(the same, for a new and for a known portal), lifecycle events (`auth[domain]`,
`auth[server_endpoint]`, `auth[client_endpoint]`), the frame session renewal, the OAuth callback
(`domain`, `server_domain`), the portal and OAuth server stored for a portal, and
`B24_OAUTH_SERVERS`. Host names come from what this machine resolves (`localhost`, the host
name and other /etc/hosts names that resolve to non-public addresses): netguard has no resolver
hook, so no other name can be pointed at the canary.

Not covered here, because the production guard refuses the first hop to any local server:
a public portal whose answer redirects to loopback (the domain-change 302) and an OAuth server
that vouches for a private `client_endpoint`. netguard has no host allow-list to let a local
fake through, so those two stay proven against `responses` stand-ins in
`tests/portals/test_bitrix.py` and `tests/portals/test_trust.py`.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from django.core import signing
from django.test import Client

from b24app.portals.bitrix.netguard import address_refusal
from b24app.portals.models import Portal
from b24app.portals.views import OAUTH_SESSION_KEY, OAUTH_STATE_SALT
from tests.support.portals import post_event, post_frame
from tests.support.results import frame_post, installed, open_screen
from tests.support.security import PUBLIC_OAUTH, connects, db_snapshot

pytestmark = pytest.mark.django_db

REFUSALS = {400, 401, 403, 404, 503}
"""A clear refusal: the request is wrong (4xx) or could not be confirmed with Bitrix24 (503)."""


def resolved_private_names() -> list[str]:
    """Host names this machine resolves to non-public addresses: the host name and /etc/hosts
    entries (`localhost` is in the corpus anyway)."""
    names = {socket.gethostname()}
    hosts = Path("/etc/hosts")
    if hosts.exists():
        for line in hosts.read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            names.update(fields[1:])
    found = []
    for name in sorted(names - {"localhost"}):
        try:
            infos = socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        if any(address_refusal(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos):
            found.append(name)
    return found


def host_corpus(port: int, local_addresses: list[str]) -> list[tuple[str, str]]:
    """(label, netloc) pairs; every loopback form names the canary's port."""
    p = port
    corpus = [
        ("loopback", f"127.0.0.1:{p}"),
        ("loopback, short", f"127.1:{p}"),
        ("loopback, decimal", f"2130706433:{p}"),
        ("loopback, hex", f"0x7f000001:{p}"),
        ("loopback, hex parts", f"0x7f.1:{p}"),
        ("loopback, octal", f"0177.0.0.1:{p}"),
        ("loopback, another 127/8", f"127.1.2.3:{p}"),
        ("loopback, trailing dot", f"127.0.0.1.:{p}"),
        ("loopback, no port", "127.0.0.1"),
        ("IPv6 loopback", f"[::1]:{p}"),
        ("IPv4-mapped loopback", f"[::ffff:127.0.0.1]:{p}"),
        ("IPv4-mapped loopback, hex", f"[::ffff:7f00:1]:{p}"),
        ("NAT64 loopback", f"[64:ff9b::7f00:1]:{p}"),
        ("6to4 loopback", f"[2002:7f00:1::1]:{p}"),
        ("localhost", f"localhost:{p}"),
        ("localhost, trailing dot", f"localhost.:{p}"),
        ("localhost, upper case", f"LOCALHOST:{p}"),
        ("*.localhost", f"portal.localhost:{p}"),
        ("unspecified", f"0.0.0.0:{p}"),
        ("unspecified, short", f"0:{p}"),
        ("IPv6 unspecified", f"[::]:{p}"),
        ("userinfo", f"a.bitrix24.com@127.0.0.1:{p}"),
        ("userinfo with a port", f"a.bitrix24.com:443@127.0.0.1:{p}"),
        ("percent-encoded", f"%31%32%37.0.0.1:{p}"),
        ("fullwidth digits", f"\uff11\uff12\uff17.\uff10.\uff10.\uff11:{p}"),
        ("ideographic full stops", f"127\u30020\u30020\u30021:{p}"),
        ("circled letters", f"\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3:{p}"),
        ("link-local metadata", "169.254.169.254"),
        ("private 10/8", "10.0.0.1"),
        ("private 172.16/12", "172.16.0.1"),
        ("private 172.16/12, top", "172.31.255.254"),
        ("private 192.168/16", "192.168.0.1"),
        ("CGNAT 100.64/10", "100.64.0.1"),
        ("ULA fc00::/7", "[fc00::1]"),
        ("IPv6 site-local fec0::/10", "[fec0::1]"),
        ("IPv4-mapped private", "[::ffff:192.168.0.1]"),
        ("documentation 192.0.2/24", "192.0.2.1"),
        ("benchmarking 198.18/15", "198.18.0.1"),
        ("IPv6 link-local", "[fe80::1]"),
        ("IPv6 link-local with a zone", "[fe80::1%25eth0]"),
    ]
    corpus += [
        (f"name resolving privately: {name}", f"{name}:{p}") for name in resolved_private_names()
    ]
    corpus += [
        (f"this machine's {address}", f"[{address}]:{p}" if ":" in address else f"{address}:{p}")
        for address in local_addresses
        if not ipaddress.ip_address(address).is_loopback
    ]
    return corpus


def url_corpus(hosts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(label, URL) pairs: each host as an https REST root, the loopback ones over http too,
    and odd URL shapes around the first one."""
    urls = [(f"https {label}", f"https://{netloc}/rest/") for label, netloc in hosts]
    urls += [
        (f"http {label}", f"http://{netloc}/rest/")
        for label, netloc in hosts
        if label.startswith(("loopback", "localhost", "IPv6 loopback"))
    ]
    netloc = hosts[0][1]
    urls += [
        ("scheme-relative", f"//{netloc}/rest/"),
        ("backslash userinfo", f"https://a.bitrix24.com\\@{netloc}/rest/"),
        ("fragment userinfo", f"https://{netloc}#@a.bitrix24.com/rest/"),
        ("allow-listed server as userinfo", f"{PUBLIC_OAUTH}@{netloc}/rest/"),
        ("allow-listed server as prefix", f"{PUBLIC_OAUTH}.{netloc}/rest/"),
        ("tab in host", f"https://127.0.0.1\t:{netloc.rsplit(':', 1)[-1]}/rest/"),
    ]
    return urls


def with_query(url: str, **params: str) -> str:
    """`url` with `params` set in its query string."""
    parts = urlsplit(url)
    query = {**dict(parse_qsl(parts.query, keep_blank_values=True)), **params}
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query)}"


class Probe:
    """Sends requests, and for each one checks the four properties of this module."""

    def __init__(self, canary, fake) -> None:
        self.canary, self.fake = canary, fake
        self.sent = 0
        self.failures: list[str] = []
        self.bad_statuses: list[str] = []
        self._canary_seen = len(canary.accepted)

    def _fake_requests(self) -> int:
        with self.fake.lock:
            return len(self.fake.requests) + sum(len(p.requests) for p in self.fake.portals)

    def __call__(self, label: str, send, *args, refusals=REFUSALS, **kwargs) -> None:
        """`send(*args, **kwargs)` one request and note what went wrong with it, if anything."""
        before, fake_before = db_snapshot(), self._fake_requests()
        with connects() as outbound:
            response = send(*args, **kwargs)
        self.sent += 1
        if response.status_code not in refusals:
            self.bad_statuses.append(f"{label}: status {response.status_code}")
        problems = []
        if db_snapshot() != before:
            problems.append("state changed")
        if outbound:
            problems.append(f"connected to {sorted(set(outbound))}")
        if self._fake_requests() != fake_before:
            problems.append("a fake Bitrix24 was contacted")
        if len(self.canary.accepted) > self._canary_seen:
            problems.append(f"canary accepted {self.canary.accepted[self._canary_seen :]}")
            self._canary_seen = len(self.canary.accepted)
        if problems:
            self.failures.append(f"{label}: {', '.join(problems)}")

    def verdict(self, *, statuses: bool = True) -> None:
        """Fail with every request that connected or changed something (and, with `statuses`,
        every one not answered with a refusal)."""
        assert self.sent, "nothing was sent"
        time.sleep(0.2)  # a connection the canary is still accepting shows up by now
        if len(self.canary.accepted) > self._canary_seen:
            late = self.canary.accepted[self._canary_seen :]
            self.failures.append(f"after the last request: canary accepted {late}")
        failures = self.failures + (self.bad_statuses if statuses else [])
        assert not failures, f"{len(failures)} problems in {self.sent} requests:\n" + "\n".join(
            failures
        )


@pytest.fixture
def attack(canary, fake, portal, client, settings):
    """The portal installed while private portals were allowed (so it is stored with the
    fake's loopback addresses), then the app switched to production; and a second portal the
    app has never seen."""
    installed(client, portal, 1)
    task = portal.add_task(title="Prepare the report")
    _, frame_token = open_screen(client, portal, 1, task)
    settings.B24_ALLOW_PRIVATE_PORTALS = False
    settings.B24_OAUTH_SERVERS = (PUBLIC_OAUTH,)
    stranger = fake.add_portal()
    stranger.add_user(name="Eve", last_name="Unknown", admin=True)
    hosts = host_corpus(canary.port, canary.addresses)
    return {
        "probe": Probe(canary, fake),
        "known": portal,
        "stranger": stranger,
        "frame_token": frame_token,
        "hosts": hosts,
        "urls": url_corpus(hosts),
    }


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_ssrf_canary_and_connect_record_see_every_connection(canary):
    """The two witnesses work: a connection to each canary address, and to `localhost`, is
    counted by the canary and recorded by the `socket.connect` audit."""
    with connects() as outbound:
        for address in canary.addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family) as sock:
                sock.connect((address, canary.port))
                sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with socket.create_connection(("localhost", canary.port), timeout=2):
            pass
    wanted = len(canary.addresses) + 1
    assert _wait_for(lambda: len(canary.connections) >= wanted), canary.connections
    assert {address for address, _ in canary.connections} == set(canary.addresses)
    assert sorted(received for _, received in canary.connections) == [0] + [18] * (wanted - 1)
    assert {address for address, _ in outbound} >= set(canary.addresses)
    assert "127.0.0.1" in canary.addresses and len(canary.addresses) >= 2


def test_ssrf_install_post_hosts_are_refused_without_a_connection(client, attack):
    probe, stranger = attack["probe"], attack["stranger"]
    for label, url in attack["urls"]:
        page, fields = stranger.install_post(1)
        fields["SERVER_ENDPOINT"] = url
        probe(f"install SERVER_ENDPOINT {label}", post_frame, client, page, fields)
    for label, netloc in attack["hosts"]:
        page, fields = stranger.install_post(1)
        fields["SERVER_ENDPOINT"] = PUBLIC_OAUTH  # allow-listed: only DOMAIN is wrong
        probe(
            f"install DOMAIN {label}", post_frame, client, with_query(page, DOMAIN=netloc), fields
        )
    probe.verdict()


@pytest.mark.parametrize("whose", ["stranger", "known"])
def test_ssrf_placement_post_hosts_are_refused_without_a_connection(client, attack, whose):
    probe, portal = attack["probe"], attack[whose]
    for label, url in attack["urls"]:
        page, fields = portal.frame_post(1)
        # Without the application token even a known portal is checked with the OAuth server.
        fields.update(SERVER_ENDPOINT=url, APPLICATION_TOKEN="")
        probe(f"placement SERVER_ENDPOINT {label}", post_frame, client, page, fields)
    for label, netloc in attack["hosts"]:
        page, fields = portal.frame_post(1)
        fields["SERVER_ENDPOINT"] = PUBLIC_OAUTH
        probe(
            f"placement DOMAIN {label}", post_frame, client, with_query(page, DOMAIN=netloc), fields
        )
    probe.verdict()


@pytest.mark.parametrize("event, whose", [("ONAPPINSTALL", "stranger"), ("ONAPPUPDATE", "known")])
def test_ssrf_event_auth_hosts_are_refused_without_a_connection(client, attack, event, whose):
    probe, portal = attack["probe"], attack[whose]
    for label, url in attack["urls"]:
        body = portal.event_body(event, extra_auth={"server_endpoint": url})
        probe(f"{event} auth[server_endpoint] {label}", post_event, client, body)
        # With an allow-listed OAuth server, the client endpoint and domain are all that is odd.
        body = portal.event_body(
            event, extra_auth={"server_endpoint": PUBLIC_OAUTH, "client_endpoint": url}
        )
        probe(f"{event} auth[client_endpoint] {label}", post_event, client, body)
    for label, netloc in attack["hosts"]:
        body = portal.event_body(event, extra_auth={"domain": netloc, "server_endpoint": ""})
        probe(f"{event} auth[domain] {label}", post_event, client, body)
    probe.verdict()


def test_ssrf_session_renewal_never_leaves_for_a_host_it_is_given(attack):
    """Renewal asks only the portal stored for the session, whatever the request names; that
    portal's loopback address is refused too, with a clear answer."""
    probe, portal, token = attack["probe"], attack["known"], attack["frame_token"]
    client = Client(raise_request_exception=False)
    for label, url in attack["urls"]:
        tokens = portal.issue_tokens(1)
        netloc = urlsplit(url).netloc
        fields = {
            "AUTH_ID": tokens["access_token"],
            "REFRESH_ID": tokens["refresh_token"],
            "AUTH_EXPIRES": "3600",
            "SERVER_ENDPOINT": url,
            "client_endpoint": url,
            "DOMAIN": netloc,
        }
        path = f"/b24/app/session/?{urlencode({'DOMAIN': netloc})}"
        probe(f"renewal {label}", frame_post, client, token, path, fields)
    probe.verdict()


def test_ssrf_oauth_callback_ignores_the_hosts_it_names(admin_client, attack):
    probe, portal = attack["probe"], attack["known"]
    stored = Portal.objects.get(member_id=portal.member_id)
    for label, netloc in attack["hosts"]:
        # A reconnect started in this session (the start itself refuses the loopback portal
        # here, so the session's nonce is put in place as a successful start leaves it).
        session, nonce = admin_client.session, f"nonce-{label}"
        session[OAUTH_SESSION_KEY] = nonce
        session.save()
        state = signing.dumps({"m": stored.member_id, "n": nonce}, salt=OAUTH_STATE_SALT)
        query = urlencode(
            {
                "code": "0" * 32,
                "state": state,
                "domain": netloc,
                "server_domain": netloc,
                "member_id": portal.member_id,
            }
        )
        # The operator is sent back to the admin page (302), the refusal shown as a message.
        path = f"/b24/oauth/callback/?{query}"
        probe(f"oauth callback {label}", admin_client.get, path, refusals={302})
    probe.verdict()


def _stored_portal_requests(client, attack, probe) -> None:
    portal, token = attack["known"], attack["frame_token"]
    page, fields = portal.frame_post(1)
    probe("placement POST of the stored portal", post_frame, client, page, fields)
    path = "/b24/app/task/"
    probe("frame request of the stored portal", frame_post, client, token, path, {"task": 1})
    tokens = portal.issue_tokens(1)
    renewal = {"AUTH_ID": tokens["access_token"], "REFRESH_ID": tokens["refresh_token"]}
    probe("renewal for the stored portal", frame_post, client, token, "/b24/app/session/", renewal)


def test_ssrf_portal_stored_on_a_private_address_gets_a_clear_refusal(attack):
    """A portal stored with loopback addresses (kept from an earlier private setting, or a
    tampered row) is never contacted in production when someone opens the app, reads results
    or renews a session, and each of them gets a clear refusal."""
    probe = attack["probe"]
    _stored_portal_requests(Client(raise_request_exception=False), attack, probe)
    probe.verdict()


@pytest.fixture
def misconfigured(attack, canary, settings):
    """An operator put loopback addresses on B24_OAUTH_SERVERS (the allow-list itself)."""
    settings.B24_OAUTH_SERVERS = (
        f"https://127.0.0.1:{canary.port}",
        f"https://localhost:{canary.port}",
    )
    return attack


def _ask_misconfigured_servers(client, attack, canary) -> None:
    for server in (f"https://127.0.0.1:{canary.port}", f"https://localhost:{canary.port}"):
        page, fields = attack["stranger"].install_post(1)
        fields["SERVER_ENDPOINT"] = server + "/rest/"
        response = post_frame(client, page, fields)
        assert response.status_code == 403, response.content.decode()[:500]
    assert not Portal.objects.filter(member_id=attack["stranger"].member_id).exists()


def test_ssrf_oauth_server_on_loopback_gets_no_byte(client, misconfigured, canary):
    """Even an allow-listed OAuth server on loopback never receives a byte (so no token): the
    guarded connection checks its peer right after connecting and before TLS."""
    _ask_misconfigured_servers(client, misconfigured, canary)
    assert _wait_for(lambda: len(canary.connections) == len(canary.accepted), seconds=3)
    assert all(received == 0 for _, received in canary.connections), canary.connections
