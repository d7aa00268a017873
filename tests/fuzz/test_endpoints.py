"""Property-based fuzzing of every endpoint Bitrix24, a browser or an operator can reach.

Each test builds one installed world (two fake portals A and B with the app installed, a task
with results on A, genuine frame tokens, genuine install/frame/event/OAuth requests), then lets
Hypothesis throw requests at one endpoint: random PHP-bracket keys, duplicated keys, huge
values, NUL, lone surrogates (sent as the invalid UTF-8 a browser could send), numbers as
strings (ASCII, Unicode digits, floats), JSON-ish garbage for PLACEMENT_OPTIONS, genuine field
names with random values, and genuine requests with exactly one field mutated.

Every example runs in a savepoint that is rolled back, and the fake portals' results are put
back, so examples are independent. For every example:

1. no 5xx, except the documented 503 "Bitrix24 is busy / could not confirm" answer, whose body
   must say so. A view's exception fails the example with its traceback; a request Django
   cannot even build (before any middleware) is replayed through `b24app.wsgi.application`,
   gunicorn's target, and an exception out of that counts as a 500;
2. without a genuine, current credential no Portal, Account or ResultChange row changes; with
   one, only the rows of the credential's portal (and person) change, and an access token is
   only ever stored on the account of the person it was issued to;
3. no token the fake issued (access, refresh, application token, OAuth code, client secret)
   and no frame token appears in a response body or Location header, unless the request itself
   carried that value (an echo) or it is the frame token issued to the verified caller; and
   no task result of a portal appears outside a verified session of that portal;
4. every HTML response carries `frame-ancestors`: `'none'`, or exactly the portal origin for a
   verified frame page. One documented exception (docs/SECURITY.md, known limit 7): an inert
   refusal page (no form, no frame token) may name the plain host the query's DOMAIN claims.

The oracles ("does this request carry a genuine, current credential, and for what?") are
independent of the app's code: they ask the fake which tokens it issued, to whom, and whether
they are still live, and compare with the genuine values the world was built with.

Environment: the Hypothesis profile (tests/fuzz/profiles.py: 100 examples per test in CI, 200
elsewhere, `HYPOTHESIS_PROFILE` picks another), `FUZZ_EXAMPLES=<n>` examples per test instead
of the profile's count; `FUZZ_SHRINK=0` skips shrinking; `FUZZ_SHRINK_SECONDS` caps it (default
20, see conftest.py).
`pytest --hypothesis-show-statistics` shows how often each status was reached with and
without a credential.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
from dataclasses import dataclass
from http.cookies import SimpleCookie
from unittest import mock
from urllib.parse import parse_qsl, quote_plus, urlsplit

import pytest
import requests
from django.conf import settings
from django.core import signing
from django.core.exceptions import SuspiciousOperation
from django.db import transaction
from django.test import Client
from hypothesis import Phase, event, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from b24app.portals import crypto, frame
from b24app.portals.models import Account, Portal
from results.models import ResultChange
from tests.support.factories import ResultChangeFactory
from tests.support.portals import install, post_frame

from .profiles import fuzz_profile

pytestmark = pytest.mark.django_db

SHRINK = os.environ.get("FUZZ_SHRINK", "1") != "0"
FUZZ = hypothesis_settings(
    fuzz_profile(),
    phases=[phase for phase in Phase if SHRINK or phase != Phase.shrink],
)
UNLIMITED = "1000000/1000000"
FRAME_TOKEN_ATTR = re.compile(r'data-frame-token="([^"]+)"')
SIGNED = re.compile(r"[A-Za-z0-9_\-.]{4,}:[0-9A-Za-z]{4,}:[A-Za-z0-9_\-]{20,}")
# The app's documented "Bitrix24 is busy / cannot be checked right now" answers (en, ru).
BUSY_MARKERS = (
    "is busy right now",
    "could not confirm the request right now",
    "could not show the results right now",
    "not connected to Bitrix24 yet",
    "сейчас занят",
    "не смог подтвердить",
    "не может показать результаты",
    "unavailable",
)


# --- the installed world -----------------------------------------------------------------------


@dataclass(frozen=True)
class Real:
    """A genuine value of the world (resolved per test), optionally mutated."""

    name: str
    how: str = ""


@dataclass(frozen=True)
class Scope:
    """What a genuine credential may change: one portal, and one person of it (or all)."""

    portal_pk: int
    user_id: int | None = None


def _mutate(value: str, how: str) -> str:
    if how == "truncate":
        return value[:-1]
    if how == "drop_first":
        return value[1:]
    if how == "flip":
        middle = len(value) // 2
        if not value:
            return "x"
        char = value[middle]
        return value[:middle] + ("B" if char != "B" else "C") + value[middle + 1 :]
    if how == "upper":
        return value.upper()
    if how == "lower":
        return value.lower()
    if how == "pad":
        return f" {value} "
    if how == "nul":
        return value + "\x00"
    if how == "double":
        return value + value
    if how == "unicode":
        return value + "\u0301"
    return value


class World:
    """Portals A (Anna 1 admin, Boris 2) and B (Viktor 1 admin, Galina 2), both installed."""

    def __init__(self, client, fake, a, settings):
        self.fake, self.a = fake, a
        self.anonymous = Client()  # one per test: a new Client loads every middleware again
        settings.B24_RATE_LIMIT = UNLIMITED  # thousands of requests: not a rate-limit test
        b = fake.add_portal()
        b.add_user(name="Viktor", last_name="Orlov", admin=True)
        b.add_user(name="Galina", last_name="Sokolova")
        self.b = b
        for each in (a, b):
            each.set_rate_limit(10**6, 10**6)
            assert install(client, each).status_code == 200
        Portal.objects.update(rate_limit=UNLIMITED)
        self.portal_a = Portal.objects.get(member_id=a.member_id)
        self.portal_b = Portal.objects.get(member_id=b.member_id)
        self.fakes = {self.portal_a.pk: a, self.portal_b.pk: b}
        self.task = a.add_task(title="Fuzzed task")
        self.result_a1 = a.add_result(self.task, author_id=1, text="alpha-result-of-anna")
        self.result_a2 = a.add_result(self.task, author_id=2, text="alpha-result-of-boris")
        b.add_task(title="B's task")
        b.add_result(self.task, author_id=1, text="bravo-result-of-viktor")

        self.frame_tokens = {}
        for key, (fp, user_id) in {"a1": (a, 1), "a2": (a, 2), "b1": (b, 1)}.items():
            response = post_frame(client, *fp.frame_post(user_id, options={"taskId": "1"}))
            assert response.status_code == 200, response.content[:500]
            self.frame_tokens[key] = FRAME_TOKEN_ATTR.search(response.content.decode()).group(1)
        self.accounts = {
            "a1": Account.objects.get(portal=self.portal_a, user_id=1),
            "a2": Account.objects.get(portal=self.portal_a, user_id=2),
            "b1": Account.objects.get(portal=self.portal_b, user_id=1),
        }
        self.changes = {
            key: ResultChangeFactory(
                portal=self.accounts[key].portal,
                account=self.accounts[key],
                task_id=self.task,
                result_id=result_id,
                action=ResultChange.Action.UPDATE,
                text_after="Refused before",
                state=ResultChange.State.FAILED,
                last_error_message="Bitrix24 refused the change.",
            )
            for key, result_id in (("a1", self.result_a1), ("a2", self.result_a2), ("b1", 1))
        }
        expired_at = signing.b62_encode(int(signing.time.time()) - frame.TTL_SECONDS - 60)
        with mock.patch.object(signing.TimestampSigner, "timestamp", return_value=expired_at):
            self.expired_token = frame.issue(
                frame.FrameSession(self.portal_a.pk, self.accounts["a1"].pk, "en")
            )
        self.genuine_frame = {
            self.frame_tokens["a1"]: Scope(self.portal_a.pk, 1),
            self.frame_tokens["a2"]: Scope(self.portal_a.pk, 2),
            self.frame_tokens["b1"]: Scope(self.portal_b.pk, 1),
        }
        self.renewable = {**self.genuine_frame, self.expired_token: Scope(self.portal_a.pk, 1)}

        # Genuine requests, not sent yet: the bases the mutation tests start from.
        self.install_url, self.install_fields = a.install_post(1)
        self.frames = {
            "a1": a.frame_post(1, options={"taskId": str(self.task)}),
            "a2": a.frame_post(2, options={"taskId": str(self.task)}),
            "b1": b.frame_post(1, options={"taskId": "1"}),
        }
        self.events = {
            name: a.event_body(name) for name in ("ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL")
        }
        self.events["ONAPPINSTALL:b"] = b.event_body("ONAPPINSTALL")
        self.real = self._real_values()
        # Texts only Bitrix24 knows: shown only inside a verified session of their own portal.
        self.result_texts = {
            self.portal_a.pk: ("alpha-result-of-anna", "alpha-result-of-boris"),
            self.portal_b.pk: ("bravo-result-of-viktor",),
        }
        self.fake_state = {pk: copy.deepcopy(fp.results_by_id) for pk, fp in self.fakes.items()}

    def _real_values(self) -> dict[str, str]:
        a, b = self.a, self.b
        a1, a2, b1 = (self.frames[key][1] for key in ("a1", "a2", "b1"))
        return {
            "member_a": a.member_id,
            "member_b": b.member_id,
            "app_token_a": a.application_token,
            "app_token_b": b.application_token,
            "access_a1": a1["AUTH_ID"],
            "access_a2": a2["AUTH_ID"],
            "access_b1": b1["AUTH_ID"],
            "refresh_a1": a1["REFRESH_ID"],
            "refresh_a2": a2["REFRESH_ID"],
            "refresh_b1": b1["REFRESH_ID"],
            "domain_a": a.domain,
            "domain_b": b.domain,
            "server_endpoint": self.fake.server_endpoint,
            "oauth_url": self.fake.oauth_url,
            "client_endpoint_a": a.client_endpoint,
            "client_endpoint_b": b.client_endpoint,
            "client_id": self.fake.client_id,
            "frame_a1": self.frame_tokens["a1"],
            "frame_a2": self.frame_tokens["a2"],
            "frame_b1": self.frame_tokens["b1"],
            "frame_expired": self.expired_token,
            "frame_cross": frame.issue(
                frame.FrameSession(self.portal_a.pk, self.accounts["b1"].pk, "en")
            ),
            "frame_gone": frame.issue(frame.FrameSession(self.portal_a.pk, 10**9, "en")),
            "task": str(self.task),
            "result_a1": str(self.result_a1),
            "result_a2": str(self.result_a2),
            "change_a1": str(self.changes["a1"].pk),
            "change_a2": str(self.changes["a2"].pk),
            "change_b1": str(self.changes["b1"].pk),
            "portal_pk_a": str(self.portal_a.pk),
            "account_pk_a1": str(self.accounts["a1"].pk),
            "user_1": "1",
            "user_2": "2",
        }

    # values

    def resolve(self, value) -> str:
        if isinstance(value, Real):
            return _mutate(self.real[value.name], value.how)
        return value

    def resolve_pairs(self, pairs) -> list[tuple[str, str]]:
        return [(self.resolve(key), self.resolve(value)) for key, value in pairs]

    def resolve_body(self, body):
        """A generated body as sent: raw bytes as they are, form pairs resolved."""
        return body if isinstance(body, bytes) else self.resolve_pairs(body)

    def sent(self, method, path, query, body, content_type, extra) -> Sent:
        """The request a generated case describes, with every `Real` value resolved."""
        headers = {name: self.resolve(value) for name, value in extra.items()}
        return Sent(
            method,
            path,
            self.resolve_pairs(query),
            self.resolve_body(body),
            content_type,
            headers,
        )

    def portal_pk_of(self, member_id) -> int | None:
        return {self.a.member_id: self.portal_a.pk, self.b.member_id: self.portal_b.pk}.get(
            member_id
        )

    def access_owner(self, token) -> tuple[str, int] | None:
        """(member_id, user_id) of a live access token the fake issued, else None."""
        with self.fake.lock:
            issued = self.fake.access_tokens.get(token)
            if issued is None or issued.revoked or issued.expires_at <= self.fake.now():
                return None
            return issued.member_id, issued.user_id

    def token_owner(self, token) -> tuple[str, int] | None:
        """(member_id, user_id) of any access or refresh token the fake ever issued."""
        with self.fake.lock:
            issued = self.fake.access_tokens.get(token) or self.fake.refresh_tokens.get(token)
            return (issued.member_id, issued.user_id) if issued is not None else None

    def is_admin(self, member_id, user_id) -> bool:
        portal = self.fake.portal(member_id)
        user = portal.users.get(user_id) if portal is not None else None
        return bool(user and user.admin)

    def origin(self, portal_pk) -> str:
        return Portal.objects.get(pk=portal_pk).origin

    def secrets(self) -> set[str]:
        """Every value the fake issued that must never be shown."""
        with self.fake.lock:
            values = set(self.fake.access_tokens) | set(self.fake.refresh_tokens)
            values |= set(self.fake.codes)
            values |= {portal.application_token for portal in self.fake.portals}
        return values | {self.fake.client_secret}

    def restore_fake(self) -> None:
        for pk, fp in self.fakes.items():
            with fp.lock:
                fp.results_by_id = copy.deepcopy(self.fake_state[pk])
                fp.idempotency.clear()
                fp.requests.clear()
        with self.fake.lock:
            self.fake.requests.clear()
            self.fake.token_calls.clear()


@pytest.fixture
def world(client, fake, portal, settings):
    return World(client, fake, portal, settings)


# --- strategies --------------------------------------------------------------------------------

REAL_NAMES = (
    "member_a",
    "member_b",
    "app_token_a",
    "app_token_b",
    "access_a1",
    "access_a2",
    "access_b1",
    "refresh_a1",
    "refresh_a2",
    "refresh_b1",
    "domain_a",
    "domain_b",
    "server_endpoint",
    "oauth_url",
    "client_endpoint_a",
    "client_endpoint_b",
    "client_id",
    "frame_a1",
    "frame_a2",
    "frame_b1",
    "frame_expired",
    "frame_cross",
    "frame_gone",
    "task",
    "result_a1",
    "result_a2",
    "change_a1",
    "change_a2",
    "change_b1",
    "portal_pk_a",
    "account_pk_a1",
    "user_1",
    "user_2",
)
HOWS = (
    "truncate",
    "drop_first",
    "flip",
    "upper",
    "lower",
    "pad",
    "nul",
    "nul",
    "double",
    "unicode",
)
FRAME_NAMES = ("frame_a1", "frame_a2", "frame_b1", "frame_expired", "frame_cross", "frame_gone")
ACCESS_NAMES = ("access_a1", "access_a2", "access_b1")

real = st.sampled_from(REAL_NAMES).map(Real)
mutated_real = st.builds(Real, st.sampled_from(REAL_NAMES), st.sampled_from(HOWS))
chars = st.characters()  # every code point but surrogates, NUL included
surrogate = st.characters(categories=["Cs"])
plain_text = st.text(chars, max_size=30)
# Characters that break things: NUL (PostgreSQL text refuses it), lone surrogates (sent as
# invalid UTF-8), line breaks, the form and bracket syntax.
nasty_chars = st.sampled_from("\x00\x00\x00\ud800\udfff\r\n\t[]&=%+;#\\\"'<>\u202e\ufeff")
# Built from pieces: a text() alphabet would drown the few nasty code points in all of Unicode.
wild_text = st.lists(
    st.one_of(st.text(chars, max_size=6), st.text(surrogate, max_size=2), nasty_chars, nasty_chars),
    max_size=6,
).map("".join)
numbers = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(0, 10**6).map(lambda n: f"000{n}"),
    st.integers(-10, 10**20).map(lambda n: f" {n} "),
    st.floats().map(repr),
    st.sampled_from(["0", "-0", "1e3", "1.0", "0x10", "NaN", "Infinity", "9" * 19, "9" * 400]),
)
unicode_digits = st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=20)
huge = st.one_of(
    st.tuples(st.sampled_from([5_000, 20_000, 70_000]), st.sampled_from("A9ж\x00[%")).map(
        lambda nc: nc[1] * nc[0]
    ),
    # Past DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB) now and then: costly to send, so rarely.
    st.integers(0, 9).map(lambda i: "A" * (2_700_000 if i == 0 else 600_000 if i == 1 else 5_000)),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(),
    plain_text,
    numbers,
    unicode_digits,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(["taskId", "ID", "URI", "id"]) | plain_text, inner, max_size=4
        ),
    ),
    max_leaves=10,
)
json_garbage = st.one_of(
    json_values.map(json.dumps),
    st.tuples(st.sampled_from(["taskId", "ID"]), json_scalars).map(
        lambda kv: json.dumps({kv[0]: kv[1]})
    ),
    st.tuples(json_values.map(json.dumps), st.integers(0, 40)).map(lambda sn: sn[0][: sn[1]]),
    st.sampled_from([10, 999, 1_001, 5_000, 50_000]).map(lambda n: "[" * n + "]" * n),
    st.sampled_from([10, 1_001, 20_000]).map(lambda n: '{"a":' * n),
    st.sampled_from(["", "null", "{}", "[]", '"1"', "{", "NaN", '{"taskId":"1"}', '{"ID":"1"}']),
)
values = st.one_of(
    plain_text,
    wild_text,
    numbers,
    unicode_digits,
    json_garbage,
    huge,
    real,
    real,
    mutated_real,
    st.just(""),
)


many_fields = st.integers(990, 1100).map(lambda n: [(f"field{i}", "1") for i in range(n)])


def bracket_keys(heads, subkeys):
    return st.builds(
        lambda head, parts, tail: head + "".join(f"[{part}]" for part in parts) + tail,
        st.one_of(st.sampled_from(heads), plain_text),
        st.lists(st.one_of(st.sampled_from(subkeys), plain_text, st.just("")), max_size=6),
        st.sampled_from(["", "", "", "[", "]", "][", "x", "[]", "[[x]]"]),
    )


def keys(names, heads=("auth", "data", "event"), subkeys=("member_id", "application_token")):
    return st.one_of(
        st.sampled_from(names),
        st.sampled_from(names),
        bracket_keys(heads, subkeys),
        wild_text,
    )


def pairs_of(key_strategy, value_strategy=values, max_size=12):
    """Form bodies: a few pairs, or around DATA_UPLOAD_MAX_NUMBER_FIELDS (1000) of them."""
    return st.one_of(
        st.lists(st.tuples(key_strategy, value_strategy), max_size=max_size),
        st.lists(st.tuples(key_strategy, value_strategy), max_size=max_size),
        many_fields,
    )


def query_of(key_strategy, value_strategy=values, max_size=6):
    """Query strings: a few pairs (too many of them are the transport test's business)."""
    return st.lists(st.tuples(key_strategy, value_strategy), max_size=max_size)


INSTALL_FIELDS = (
    "AUTH_ID",
    "AUTH_EXPIRES",
    "REFRESH_ID",
    "SERVER_ENDPOINT",
    "APPLICATION_TOKEN",
    "APPLICATION_SCOPE",
    "member_id",
    "status",
    "PLACEMENT",
    "PLACEMENT_OPTIONS",
)
FRAME_QUERY = ("DOMAIN", "PROTOCOL", "LANG", "APP_SID", "lang", "task", "ids")
FRAME_FIELDS = (
    "frame_token",
    "task",
    "text",
    "text_before",
    "ids",
    "AUTH_ID",
    "REFRESH_ID",
    "AUTH_EXPIRES",
)
EVENT_HEADS = ("event", "event_handler_id", "data", "ts", "auth")
EVENT_SUBKEYS = (
    "member_id",
    "application_token",
    "access_token",
    "refresh_token",
    "domain",
    "server_endpoint",
    "client_endpoint",
    "user_id",
    "expires",
    "expires_in",
    "scope",
    "status",
    "CLEAN",
    "VERSION",
    "LANGUAGE_ID",
    "INSTALLED",
)
EVENT_NAMES = (
    "ONAPPINSTALL",
    "ONAPPUPDATE",
    "ONAPPUNINSTALL",
    "onappuninstall",
    "OnAppInstall",
    "ONAPPTEST",
    "ONTASKADD",
)
event_keys = st.one_of(
    st.sampled_from([f"auth[{sub}]" for sub in EVENT_SUBKEYS] + ["event", "data[CLEAN]", "ts"]),
    bracket_keys(EVENT_HEADS, EVENT_SUBKEYS),
    wild_text,
)
event_values = st.one_of(values, st.sampled_from(EVENT_NAMES))
auth_values = st.one_of(values, wild_text, mutated_real, real)
# Bodies shaped like Bitrix24's: an event name, an auth block and a data block, every value
# random, then random extra pairs.
event_shaped = st.builds(
    lambda name, auth, data, extra: [
        ("event", name),
        *((f"auth[{key}]", value) for key, value in auth.items()),
        *((f"data[{key}]", value) for key, value in data.items()),
        *extra,
    ],
    st.one_of(st.sampled_from(EVENT_NAMES), event_values),
    st.dictionaries(st.sampled_from(EVENT_SUBKEYS), auth_values, max_size=8),
    st.dictionaries(st.sampled_from(["CLEAN", "VERSION", "LANGUAGE_ID"]), values, max_size=3),
    st.lists(st.tuples(event_keys, event_values), max_size=4),
)

CONTENT_TYPES = (
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=utf-8",
    "application/x-www-form-urlencoded; charset=koi8-r",
    "application/x-www-form-urlencoded; charset=no-such-charset",
    "application/json",
    "text/plain",
    "multipart/form-data",
    "multipart/form-data; boundary=fuzz",
)
latin1_text = st.text(st.characters(max_codepoint=255), max_size=40)
header_values = {
    "HTTP_ACCEPT": st.sampled_from(
        ["application/json", "text/html", "*/*", "application/json, text/html", ""]
    )
    | latin1_text,
    "HTTP_ACCEPT_LANGUAGE": st.sampled_from(["ru", "en", "de", "ru-RU,ru;q=0.9", "*"])
    | latin1_text,
    "HTTP_X_FORWARDED_PROTO": st.sampled_from(["https", "http"]) | latin1_text,
    "HTTP_COOKIE": latin1_text,
    "HTTP_ORIGIN": st.sampled_from(["null", "https://evil.example"]) | latin1_text,
    "HTTP_X_FRAME_TOKEN": st.sampled_from(FRAME_NAMES).map(Real)
    | st.builds(Real, st.sampled_from(FRAME_NAMES), st.sampled_from(HOWS[:6]))
    | latin1_text,
}
headers = st.dictionaries(
    st.sampled_from(sorted(header_values)), st.just(None), max_size=4
).flatmap(lambda chosen: st.fixed_dictionaries({name: header_values[name] for name in chosen}))
hosts = st.sampled_from(["testserver", "127.0.0.1", "evil.example", "testserver:80", ""])
hosts |= latin1_text
methods = st.sampled_from(["POST"] * 15 + ["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
raw_bodies = st.binary(max_size=200)

# One mutation of a genuine request: (where, kind, index, key, value).
MUTATION_KINDS = (
    "replace",
    "replace",
    "replace",
    "poison",
    "poison",
    "delete",
    "append",
    "prepend",
    "rename",
    "extra",
)
POISONS = ("nul", "nul", "nul_inside", "surrogate", "huge", "fullwidth", "superscript", "space")


def _poison(value: str, how: str) -> str:
    """The genuine value, spoilt the way browsers and proxies and attackers spoil values."""
    if how == "nul":
        return value + "\x00"
    if how == "nul_inside":
        return value[:1] + "\x00" + value[1:]
    if how == "surrogate":
        return value + "\ud800"
    if how == "huge":
        return (value or "x") * (70_000 // max(1, len(value)) + 1)
    if how == "fullwidth":
        return value.translate({ord(d): 0xFF10 + int(d) for d in "0123456789"})
    if how == "superscript":
        return value.translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f" {value}\t"


RENAMES = ("upper", "lower", "bracket", "space", "nul", "empty_bracket", "depth")


def _rename(key: str, how: str) -> str:
    return {
        "upper": key.upper(),
        "lower": key.lower(),
        "bracket": key + "[x]",
        "space": key + " ",
        "nul": key + "\x00",
        "empty_bracket": key + "[]",
        "depth": key + "[a][b][c][d]",
    }[how]


mutations = st.tuples(
    st.sampled_from(["body", "body", "body", "query"]),
    st.sampled_from(MUTATION_KINDS),
    st.integers(0, 50),
    st.one_of(st.sampled_from(RENAMES), st.sampled_from(POISONS), wild_text),
    values,
)


def apply_mutation(world, query, body, mutation):
    """`query` and `body` with exactly one change (the one `mutation` describes): `index`
    picks the field (an int by position, a str by name)."""
    where, kind, index, key_or_rename, value = mutation
    pairs = list(query if where == "query" else body)
    value = world.resolve(value)
    if not pairs or kind == "extra":
        key = key_or_rename if key_or_rename not in RENAMES + POISONS else "extra"
        pairs.append((key, value))
    else:
        names = [name for name, _ in pairs]
        # An int picks a field by position, a str by name (the pinned examples use names).
        position = names.index(index) if index in names else int(index) % len(pairs)
        key, old = pairs[position]
        if kind == "replace":
            pairs[position] = (key, value)
        elif kind == "poison":
            how = key_or_rename if key_or_rename in POISONS else "nul"
            pairs[position] = (key, _poison(old, how))
        elif kind == "delete":
            del pairs[position]
        elif kind == "append":
            pairs.append((key, value))
        elif kind == "prepend":
            pairs.insert(0, (key, value))
        else:  # rename
            how = key_or_rename if key_or_rename in RENAMES else "bracket"
            pairs[position] = (_rename(key, how), old)
    return (pairs, body) if where == "query" else (query, pairs)


# --- sending and checking ----------------------------------------------------------------------


def _encode(text: str) -> str:
    return quote_plus(text.encode("utf-8", "surrogatepass"))


def form(pairs) -> str:
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in pairs)


@dataclass
class Sent:
    method: str
    path: str
    query: list
    body: list | bytes
    content_type: str
    headers: dict

    @property
    def text(self) -> str:
        """Everything the request carried, for telling an echo from a leak."""
        parts = [self.path]
        for key, value in self.query:
            parts += [key, value]
        if isinstance(self.body, bytes):
            parts.append(self.body.decode("latin-1"))
        else:
            for key, value in self.body:
                parts += [key, value]
        parts += self.headers.values()
        return "\n".join(parts)

    def last(self, key, *, in_query=False):
        """The value Django's QueryDict.get() would give (the last one), else None."""
        source = self.query if in_query else self.form_pairs
        found = [value for name, value in source if name == key]
        return found[-1] if found else None

    @property
    def form_pairs(self) -> list:
        if isinstance(self.body, bytes) or self.method != "POST":
            return []
        if not self.content_type.startswith("application/x-www-form-urlencoded"):
            return []
        return self.body


def send(client, sent: Sent):
    body = sent.body if isinstance(sent.body, bytes) else form(sent.body).encode("ascii")
    query = form(sent.query) if sent.query else ""
    try:
        return client.generic(
            sent.method,
            sent.path + ("?" + query if query else ""),
            data=body,
            content_type=sent.content_type,
            **sent.headers,
        )
    except SuspiciousOperation:
        # Django's handler turns these into 400s; one that escapes the test client was raised
        # while the request object was being built, before any middleware (e.g. >1000 query
        # fields with a charset in the Content-Type). What a client then gets depends on the
        # WSGI entry gunicorn runs, so ask that.
        return through_wsgi_entry(sent, query, body)


class WsgiAnswer:
    """What the app's WSGI entry (`b24app.wsgi.application`) answered, shaped for `check`."""

    streaming = False

    def __init__(self, status: str, headers, content: bytes):
        self.status_code = int(status.split()[0])
        self.headers = {name.lower(): value for name, value in headers}
        self.content = content

    def get(self, name, default=None):
        return self.headers.get(name.lower(), default)


def through_wsgi_entry(sent: Sent, query: str, body: bytes) -> WsgiAnswer:
    """The request through gunicorn's target; an exception out of it is a 500 from gunicorn."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    from b24app.wsgi import application

    environ = {
        "REQUEST_METHOD": sent.method,
        "PATH_INFO": sent.path,
        "QUERY_STRING": query,
        "CONTENT_TYPE": sent.content_type,
        "CONTENT_LENGTH": str(len(body)),
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "testserver",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        **sent.headers,
    }
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, headers

    # As Django's test client does: these would close the test's database connection.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        chunks = application(environ, start_response)
        try:
            content = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
    except Exception as exc:
        raise AssertionError(
            f"{sent.method} {sent.path}: {type(exc).__name__} escaped the WSGI entry "
            f"(content type {sent.content_type!r}, {len(sent.query)} query fields): "
            "gunicorn answers 500"
        ) from exc
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    return WsgiAnswer(answer["status"], answer["headers"], content)


def snapshot() -> dict:
    return {
        model: {row["id"]: row for row in model.objects.order_by("pk").values()}
        for model in (Portal, Account, ResultChange)
    }


def _body_text(response) -> str:
    if getattr(response, "streaming", False):
        return ""
    text = response.content.decode("utf-8", "replace")
    if "json" in response.get("Content-Type", ""):
        try:
            return json.dumps(json.loads(text), ensure_ascii=False)
        except ValueError:
            return text
    return text


def frame_ancestors(response) -> str | None:
    for directive in response.get("Content-Security-Policy", "").split(";"):
        name, _, value = directive.strip().partition(" ")
        if name == "frame-ancestors":
            return value.strip()
    return None


def check(world, sent: Sent, response, before, after, scope: Scope | None) -> None:
    """The four properties for one exchange; `scope` is what the request's genuine, current
    credential (if any) may change."""
    body = _body_text(response)
    where = f"{sent.method} {sent.path} -> {response.status_code}"

    # 1. never a 5xx, but the documented "Bitrix24 busy / unverifiable" 503
    if response.status_code == 503:
        assert any(marker in body for marker in BUSY_MARKERS), f"{where}: 503 saying {body[:300]}"
    else:
        assert response.status_code < 500, f"{where}: {body[:300]}"

    # 2. state: nothing without a credential; only the credential's own rows with one
    if scope is None:
        for model in before:
            assert before[model] == after[model], f"{where}: {model.__name__} changed"
    else:
        _check_scope(world, before, after, scope, where)

    # 3. no secret issued by the fake, and no frame token but the caller's own
    location = response.get("Location", "")
    shown = body + "\n" + location
    carried = sent.text
    for secret in world.secrets():
        if secret and secret in shown:
            assert secret in carried, f"{where}: shows a token issued by the fake"
    for candidate in SIGNED.findall(shown):
        try:
            payload = signing.loads(candidate, key=settings.B24_FRAME_SIGNING_KEY, salt=frame.SALT)
        except signing.BadSignature:
            continue
        if candidate in carried:
            continue  # an echo of what the caller sent
        assert scope is not None, f"{where}: issues a frame token without a credential"
        account = Account.objects.filter(pk=payload.get("a")).first()
        assert account is not None and payload.get("p") == scope.portal_pk, where
        assert scope.user_id in (None, account.user_id), f"{where}: a token for someone else"

    # ... and no portal's data outside a verified session of that portal
    for portal_pk, texts in world.result_texts.items():
        for text in texts:
            if text in shown and text not in carried:
                assert scope is not None and scope.portal_pk == portal_pk, (
                    f"{where}: shows {text!r} of portal {portal_pk}"
                )

    # 4. framing: 'none'; the verified portal's origin for a verified page; at most the portal
    #    the query names (DOMAIN/PROTOCOL) for an inert refusal (docs/SECURITY.md, known limit 7)
    ancestors = frame_ancestors(response)
    is_html = "text/html" in response.get("Content-Type", "")
    if is_html:
        assert ancestors is not None, f"{where}: HTML without frame-ancestors"
    if ancestors not in (None, "'none'"):
        if scope is None or ancestors != world.origin(scope.portal_pk):
            # A HEAD answer has no body (the test client strips it, as servers do): nothing to
            # show in a frame, so only its status and the origin it names are checked.
            page = 'data-screen="refused"' in body or 'data-screen="install"' in body
            inert_refusal = (
                is_html
                and response.status_code >= 400
                and (page or (sent.method == "HEAD" and not body))
                and "<form" not in body
                and "data-frame-token" not in body
            )
            assert inert_refusal, f"{where}: framable by {ancestors} without a credential"
            assert ancestors == claimed_origin(sent), f"{where}: framable by {ancestors}"
    verified_page = 'data-screen="results"' in body or (
        'data-screen="install"' in body and response.status_code == 200
    )
    if is_html and verified_page:
        assert scope is not None, f"{where}: a verified page without a credential"
        assert ancestors == world.origin(scope.portal_pk), f"{where}: frame-ancestors {ancestors}"


def claimed_origin(sent: Sent) -> str | None:
    """The origin a refusal may be framed by: the plain host name the query's DOMAIN names."""
    domain = (sent.last("DOMAIN", in_query=True) or "").strip().lower()
    if not re.fullmatch(r"[a-z0-9.\-]+(:[0-9]+)?", domain):
        return None
    scheme = "http" if sent.last("PROTOCOL", in_query=True) == "0" else "https"
    return f"{scheme}://{domain}"


def _check_scope(world, before, after, scope: Scope, where: str) -> None:
    member_of = {pk: row["member_id"] for pk, row in {**before[Portal], **after[Portal]}.items()}
    accounts = {**before[Account], **after[Account]}

    def in_scope(portal_pk, user_id) -> bool:
        return portal_pk == scope.portal_pk and scope.user_id in (None, user_id)

    for pk in before[Portal].keys() | after[Portal].keys():
        if before[Portal].get(pk) != after[Portal].get(pk):
            assert pk == scope.portal_pk, f"{where}: another portal changed"
    for pk in before[Account].keys() | after[Account].keys():
        old, new = before[Account].get(pk), after[Account].get(pk)
        if old == new:
            continue
        row = new or old
        assert in_scope(row["portal_id"], row["user_id"]), f"{where}: account {pk} changed"
        if new is None:
            continue
        # The access token is what the app can check (profile, app.info) before storing it; a
        # posted refresh token cannot be checked without spending it, so it is not judged here.
        field = "access_token_encrypted"
        if new[field] and not (old and old[field] == new[field]):
            owner = world.token_owner(crypto.decrypt(new[field]))
            stored_for = (member_of[new["portal_id"]], new["user_id"])
            assert owner in (None, stored_for), (
                f"{where}: the access token of {owner} stored on the account of {stored_for}"
            )
        # A refresh token is replaced, never dropped from a working account (a frame POST or
        # renewal without REFRESH_ID keeps it); only one Bitrix24 refused, or an uninstall, ends it.
        if old and old["refresh_token_encrypted"] and not new["refresh_token_encrypted"]:
            assert old["state"] != Account.State.ACTIVE or new["state"] == Account.State.BLOCKED, (
                f"{where}: the refresh token of account {pk} was dropped"
            )
    for pk in before[ResultChange].keys() | after[ResultChange].keys():
        old, new = before[ResultChange].get(pk), after[ResultChange].get(pk)
        if old != new:
            account = accounts.get((new or old)["account_id"])
            assert account is not None and in_scope(account["portal_id"], account["user_id"]), (
                f"{where}: result change {pk} of another person changed"
            )


def exchange(world, client, sent: Sent, scope_of) -> None:
    """Send one request in a rolled-back savepoint and check it; `scope_of(sent)` is the oracle."""
    cookies = SimpleCookie(client.cookies.output(header="", sep="\n"))
    try:
        with transaction.atomic():
            before = snapshot()
            response = send(client, sent)
            after = snapshot()
            scope = scope_of(sent)
            # `pytest --hypothesis-show-statistics` shows how often each outcome was reached.
            event(f"{response.status_code} {'with' if scope else 'without'} a credential")
            event("state changed" if before != after else "state unchanged")
            check(world, sent, response, before, after, scope)
            transaction.set_rollback(True)
    finally:
        world.restore_fake()
        client.cookies = cookies


# --- oracles: does the request carry a genuine, current credential, and for what? --------------


def install_scope(world, sent: Sent) -> Scope | None:
    """An admin's live AUTH_ID for the posted member_id, a refresh token, a matching DOMAIN."""
    if sent.method != "POST":
        return None
    owner = world.access_owner(sent.last("AUTH_ID"))
    member_id = sent.last("member_id")
    domain = sent.last("DOMAIN", in_query=True)
    portal_pk = world.portal_pk_of(member_id)
    if owner is None or owner[0] != member_id or portal_pk is None:
        return None
    if not sent.last("REFRESH_ID") or not world.is_admin(*owner):
        return None
    if domain and domain.lower() != world.fake.portal(member_id).domain.lower():
        return None
    return Scope(portal_pk)


def screen_scope(world, sent: Sent) -> Scope | None:
    """A live AUTH_ID of a person of the posted member_id and a matching DOMAIN. REFRESH_ID is
    optional (§3.2) and no credential: it cannot be checked without spending it."""
    if sent.method != "POST":
        return None
    owner = world.access_owner(sent.last("AUTH_ID"))
    member_id = sent.last("member_id")
    domain = sent.last("DOMAIN", in_query=True)
    portal_pk = world.portal_pk_of(member_id)
    if owner is None or owner[0] != member_id or portal_pk is None:
        return None
    if domain and domain.lower() != world.fake.portal(member_id).domain.lower():
        return None
    return Scope(portal_pk, owner[1])


def event_scope(world, sent: Sent) -> Scope | None:
    """docs/SECURITY.md: ONAPPUNINSTALL is proven by the stored `application_token` (and our
    own tokens having stopped working); ONAPPINSTALL/ONAPPUPDATE by a live access token of a
    portal admin that the OAuth server vouches for (they then store a new application token).

    Generous on purpose: a body counts as credentialed when the genuine values appear under any
    key naming the field, whatever else it holds. Who the stored tokens belong to is checked
    separately (`_check_scope`)."""
    if sent.method != "POST":
        return None
    pairs = sent.form_pairs
    names = {value.strip().upper() for key, value in pairs if key.startswith("event")}
    for fp in (world.a, world.b):
        if not any("member_id" in key and value == fp.member_id for key, value in pairs):
            continue
        scope = Scope(world.portal_pk_of(fp.member_id))
        app_token = [value for key, value in pairs if "application_token" in key]
        if "ONAPPUNINSTALL" in names and fp.application_token in app_token:
            return scope
        owners = [world.access_owner(value) for key, value in pairs if "access_token" in key]
        admin = any(o and o[0] == fp.member_id and world.is_admin(*o) for o in owners)
        if admin and any(app_token) and names & {"ONAPPINSTALL", "ONAPPUPDATE"}:
            return scope
    return None


def _presented_frame_token(sent: Sent) -> list[str]:
    """What `frame.from_request` may read: the header, else the form field."""
    header = sent.headers.get("HTTP_X_FRAME_TOKEN")
    if header:
        return [header]
    return [value for key, value in sent.form_pairs if key == frame.FIELD]


def frame_scope(world, sent: Sent) -> Scope | None:
    for token in _presented_frame_token(sent):
        if token in world.genuine_frame:
            return world.genuine_frame[token]
    return None


def renew_scope(world, sent: Sent) -> Scope | None:
    """A genuine frame token (even expired) plus a live AUTH_ID of the same person (REFRESH_ID
    optional, as in placement POSTs)."""
    if sent.method != "POST":
        return None
    for token in _presented_frame_token(sent):
        scope = world.renewable.get(token)
        if scope is None:
            continue
        owner = world.access_owner(sent.last("AUTH_ID"))
        member_id = Portal.objects.get(pk=scope.portal_pk).member_id
        if owner == (member_id, scope.user_id):
            return scope
    return None


# --- POST /b24/install/ ------------------------------------------------------------------------

install_query_keys = keys(("DOMAIN", "PROTOCOL", "LANG", "APP_SID"))
install_body_keys = keys(INSTALL_FIELDS)


@FUZZ
@given(
    method=methods,
    query=query_of(install_query_keys),
    body=st.one_of(pairs_of(install_body_keys), raw_bodies),
    content_type=st.sampled_from(CONTENT_TYPES),
    extra=headers,
)
@example(  # NULs where the installer looks things up
    method="POST",
    query=[("DOMAIN", "\x00"), ("LANG", "\x00")],
    body=[("AUTH_ID", "\x00"), ("REFRESH_ID", "\x00"), ("member_id", "\x00")],
    content_type=CONTENT_TYPES[0],
    extra={},
)
def test_install_random_requests_change_nothing(world, method, query, body, content_type, extra):
    """Random methods, queries, bodies (installer field names, bracket keys, raw bytes, 1000+
    fields), content types and headers: refused without the installing admin's live token."""
    sent = world.sent(method, "/b24/install/", query, body, content_type, extra)
    exchange(world, world.anonymous, sent, lambda s: install_scope(world, s))


@FUZZ
@given(mutation=mutations)
def test_install_genuine_post_with_one_field_mutated(world, mutation):
    """The wizard's genuine POST with one field replaced, spoilt, dropped, doubled or renamed:
    it installs only while the admin's live AUTH_ID, member_id and DOMAIN still agree."""
    parts = urlsplit(world.install_url)
    query, body = apply_mutation(
        world, parse_qsl(parts.query), list(world.install_fields.items()), mutation
    )
    sent = Sent("POST", parts.path, query, body, CONTENT_TYPES[0], {})
    exchange(world, world.anonymous, sent, lambda s: install_scope(world, s))


# --- POST /b24/events/ -------------------------------------------------------------------------


@FUZZ
@given(
    method=methods,
    body=st.one_of(
        event_shaped, event_shaped, pairs_of(event_keys, event_values, max_size=16), raw_bodies
    ),
    content_type=st.sampled_from(CONTENT_TYPES),
    extra=headers,
)
@example(  # a NUL in the member_id an uninstall looks up
    method="POST",
    body=[
        ("event", "ONAPPUNINSTALL"),
        ("auth[member_id]", "\x00"),
        ("auth[application_token]", "x"),
    ],
    content_type=CONTENT_TYPES[0],
    extra={},
)
@example(  # a genuine admin token naming an impossible user
    method="POST",
    body=[
        ("event", "ONAPPINSTALL"),
        ("auth[member_id]", Real("member_a")),
        ("auth[access_token]", Real("access_a1")),
        ("auth[refresh_token]", Real("refresh_a1")),
        ("auth[application_token]", "x"),
        ("auth[user_id]", "-1"),
        ("auth[expires]", "1e400"),
    ],
    content_type=CONTENT_TYPES[0],
    extra={},
)
def test_events_random_bodies_change_nothing(world, method, body, content_type, extra):
    """Event-shaped and random bracket-key bodies: only a portal admin's live token (install,
    update) or the stored application token (uninstall) can change anything."""
    sent = world.sent(method, "/b24/events/", [], body, content_type, extra)
    exchange(world, world.anonymous, sent, lambda s: event_scope(world, s))


@FUZZ
@given(
    lifecycle=st.sampled_from(["ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL", "ONAPPINSTALL:b"]),
    mutation=mutations.map(lambda m: ("body", *m[1:])),
)
@example(lifecycle="ONAPPINSTALL", mutation=("body", "poison", "auth[scope]", "nul", ""))
# A non-admin's live token (every user's frame POST carries one), and another user named.
@example(
    lifecycle="ONAPPUPDATE",
    mutation=("body", "replace", "auth[access_token]", "", Real("access_a2")),
)
@example(lifecycle="ONAPPINSTALL", mutation=("body", "replace", "auth[user_id]", "", "2"))
@example(lifecycle="ONAPPUNINSTALL", mutation=("body", "poison", "auth[member_id]", "nul", ""))
def test_events_genuine_body_with_one_field_mutated(world, lifecycle, mutation):
    """Genuine ONAPPINSTALL/ONAPPUPDATE/ONAPPUNINSTALL bodies of portal A (and an install of B)
    with one field mutated."""
    _, body = apply_mutation(world, [], list(world.events[lifecycle]), mutation)
    sent = Sent("POST", "/b24/events/", [], body, CONTENT_TYPES[0], {})
    exchange(world, world.anonymous, sent, lambda s: event_scope(world, s))


# --- POST /b24/app/ (placement entry) ----------------------------------------------------------

PLACEMENTS = (
    "DEFAULT",
    "TASK_VIEW_TAB",
    "TASK_VIEW_SIDEBAR",
    "TASK_VIEW_TOP_PANEL",
    "TASK_LIST_CONTEXT_MENU",
    "task_view_tab",
    "CRM_DEAL_DETAIL_TAB",
    "",
)
screen_body_keys = keys(INSTALL_FIELDS)


@FUZZ
@given(
    method=methods,
    query=query_of(keys(FRAME_QUERY)),
    body=st.one_of(pairs_of(screen_body_keys), raw_bodies),
    content_type=st.sampled_from(CONTENT_TYPES),
    extra=headers,
)
@example(  # NULs where the placement entry looks things up
    method="POST",
    query=[("DOMAIN", "\x00")],
    body=[("AUTH_ID", "\x00"), ("REFRESH_ID", "\x00"), ("member_id", Real("member_a", "nul"))],
    content_type=CONTENT_TYPES[0],
    extra={},
)
def test_screen_random_requests_change_nothing(world, method, query, body, content_type, extra):
    """Random placement POSTs: no page, no frame token, no state without a live AUTH_ID."""
    sent = world.sent(method, "/b24/app/", query, body, content_type, extra)
    exchange(world, world.anonymous, sent, lambda s: screen_scope(world, s))


@FUZZ
@given(
    who=st.sampled_from(["a1", "a2", "b1"]),
    placement=st.none() | st.sampled_from(PLACEMENTS) | plain_text,
    options=st.none() | json_garbage,
    accept=st.sampled_from(["", "application/json"]),
    mutation=st.none() | mutations,
)
def test_screen_genuine_post_with_one_field_mutated(
    world, who, placement, options, accept, mutation
):
    """Genuine placement POSTs (Anna, Boris, Viktor) with a random PLACEMENT, JSON-ish garbage
    for PLACEMENT_OPTIONS and/or one field mutated: a screen only for the AUTH_ID's owner."""
    url, fields = world.frames[who]
    fields = dict(fields)
    if placement is not None:
        fields["PLACEMENT"] = placement
    if options is not None:
        fields["PLACEMENT_OPTIONS"] = options
    parts = urlsplit(url)
    query, body = parse_qsl(parts.query), list(fields.items())
    if mutation is not None:
        query, body = apply_mutation(world, query, body, mutation)
    sent = Sent(
        "POST", parts.path, query, body, CONTENT_TYPES[0], {"HTTP_ACCEPT": accept} if accept else {}
    )
    exchange(world, world.anonymous, sent, lambda s: screen_scope(world, s))


# --- the frame endpoints (signed frame token) --------------------------------------------------

ids = st.one_of(
    st.sampled_from(["result_a1", "result_a2", "change_a1", "change_a2", "change_b1"]).map(Real),
    st.integers(0, 10**30).map(str),
)
frame_paths = st.one_of(
    st.sampled_from(["/b24/app/task/", "/b24/app/results/add/", "/b24/app/changes/"]).map(
        lambda path: (path,)
    ),
    st.tuples(
        st.sampled_from(
            [
                "/b24/app/results/{}/edit/",
                "/b24/app/results/{}/delete/",
                "/b24/app/changes/{}/retry/",
            ]
        ),
        ids,
    ),
    st.just(("/b24/app/rebind/",)),
)
GENUINE_FRAMES = ("frame_a1", "frame_a2", "frame_b1")
frame_token_values = st.one_of(
    st.sampled_from(GENUINE_FRAMES).map(Real),
    st.sampled_from(GENUINE_FRAMES).map(Real),
    st.sampled_from(GENUINE_FRAMES).map(Real),
    st.sampled_from(FRAME_NAMES).map(Real),
    st.builds(Real, st.sampled_from(FRAME_NAMES), st.sampled_from(HOWS)),
    latin1_text,
    st.just(""),
)
frame_values = st.one_of(values, st.sampled_from(["1", "2", "1,2,3", ",,", "-1"]))
task_values = st.one_of(
    st.just(Real("task")), st.just(Real("task")), mutated_real, numbers, unicode_digits, values
)
text_values = st.one_of(
    plain_text, wild_text, huge, st.sampled_from(["", " ", "\r\n", "Done", "<b>x</b>"])
)
change_ids = st.sampled_from(["change_a1", "change_a2", "change_b1"]).map(Real)
ids_values = st.one_of(
    st.lists(st.one_of(change_ids, numbers, unicode_digits), max_size=5).map(tuple), values
)
frame_field_pairs = st.one_of(
    st.tuples(st.just("task"), task_values),
    st.tuples(st.sampled_from(["text", "text_before"]), text_values),
    st.tuples(st.just("ids"), ids_values),
    st.tuples(keys(FRAME_FIELDS), frame_values),
)
realistic_frame_body = st.tuples(task_values, text_values, st.lists(frame_field_pairs, max_size=3))
realistic_frame_body = realistic_frame_body.map(lambda t: [("task", t[0]), ("text", t[1]), *t[2]])
frame_query_pairs = st.one_of(
    st.tuples(st.sampled_from(["task", "lang", "LANG"]), task_values),
    st.tuples(st.just("ids"), ids_values),
    st.tuples(keys(FRAME_QUERY), frame_values),
)


def resolve_frame_pairs(world, pairs):
    """Frame pairs, where a tuple value is a comma-separated list (the `ids` of the polling)."""
    return [
        (
            world.resolve(key),
            ",".join(world.resolve(v) for v in value)
            if isinstance(value, tuple)
            else world.resolve(value),
        )
        for key, value in pairs
    ]


@FUZZ
@given(
    path=frame_paths,
    method=st.sampled_from(["usual"] * 8 + ["GET", "POST", "PUT", "HEAD", "DELETE"]),
    token=frame_token_values,
    carrier=st.sampled_from(["header", "header", "field", "both", "none"]),
    query=st.lists(frame_query_pairs, max_size=5),
    body=st.one_of(
        realistic_frame_body,
        realistic_frame_body,
        st.lists(frame_field_pairs, max_size=8),
        many_fields,
    ),
    content_type=st.sampled_from(CONTENT_TYPES),
    accept=st.sampled_from(["", "application/json", "text/html"]),
    extra=headers,
)
@example(  # ids that are digits to str.isdigit() only, and a NUL, in a genuine session
    path=("/b24/app/changes/",),
    method="usual",
    token=Real("frame_a1"),
    carrier="header",
    query=[("ids", ("\u00b2", "\x00", "\u0661", "9" * 30))],
    body=[],
    content_type=CONTENT_TYPES[0],
    accept="",
    extra={},
)
@example(  # a result id past 64 bits, a NUL in the text
    path=("/b24/app/results/{}/edit/", "9" * 30),
    method="usual",
    token=Real("frame_a2"),
    carrier="field",
    query=[],
    body=[("task", Real("task")), ("text", "a\x00b"), ("text_before", "\x00")],
    content_type=CONTENT_TYPES[0],
    accept="application/json",
    extra={},
)
def test_frame_endpoints_fuzzed_requests_stay_in_their_session(
    world, path, method, token, carrier, query, body, content_type, accept, extra
):
    """Every frame endpoint, any method, genuine/expired/forged/spoilt frame tokens in the
    header, the field, both or neither, realistic and random fields: a request acts only for
    the account its genuine token names, and without one changes and shows nothing."""
    template, *arguments = path
    if method == "usual":
        method = "GET" if template == "/b24/app/changes/" else "POST"
    token = world.resolve(token)
    body = resolve_frame_pairs(world, body)
    extra = {name: world.resolve(value) for name, value in extra.items()}
    extra.pop("HTTP_X_FRAME_TOKEN", None)
    if accept:
        extra["HTTP_ACCEPT"] = accept
    if carrier in ("header", "both"):
        extra["HTTP_X_FRAME_TOKEN"] = token
    if carrier in ("field", "both"):
        body.append((frame.FIELD, token))
    sent = Sent(
        method,
        template.format(*(world.resolve(argument) for argument in arguments)),
        resolve_frame_pairs(world, query),
        body,
        content_type,
        extra,
    )
    exchange(world, world.anonymous, sent, lambda s: frame_scope(world, s))


# Whose session is renewed, with whose fresh AUTH_ID: (frame token, access token, refresh token).
RENEWALS = {
    "a1": ("frame_a1", "access_a1", "refresh_a1"),
    "a2": ("frame_a2", "access_a2", "refresh_a2"),
    "b1": ("frame_b1", "access_b1", "refresh_b1"),
    "a1-expired": ("frame_expired", "access_a1", "refresh_a1"),
}


@FUZZ
@given(
    who=st.sampled_from(sorted(RENEWALS)),
    carrier=st.sampled_from(["header", "field"]),
    mutation=st.none() | mutations.map(lambda m: ("body", *m[1:])),
    swap_token=st.none() | frame_token_values,
    swap_access=st.none() | st.sampled_from(ACCESS_NAMES).map(Real),
    expires=st.one_of(st.just("3600"), numbers, values),
)
def test_session_renew_needs_the_same_persons_fresh_auth(
    world, who, carrier, mutation, swap_token, swap_access, expires
):
    """Genuine renewals (an expired or live frame token plus that person's fresh AUTH_ID), with
    one field mutated, another person's token or AUTH_ID swapped in, or both."""
    token_name, access_name, refresh_name = RENEWALS[who]
    token = world.resolve(swap_token if swap_token is not None else Real(token_name))
    body = [
        ("AUTH_ID", world.resolve(swap_access if swap_access is not None else Real(access_name))),
        ("REFRESH_ID", world.resolve(Real(refresh_name))),
        ("AUTH_EXPIRES", world.resolve(expires)),
    ]
    if carrier == "field":
        body.append((frame.FIELD, token))
    if mutation is not None:
        _, body = apply_mutation(world, [], body, mutation)
    extra = {"HTTP_X_FRAME_TOKEN": token} if carrier == "header" else {}
    sent = Sent("POST", "/b24/app/session/", [], body, CONTENT_TYPES[0], extra)
    exchange(world, world.anonymous, sent, lambda s: renew_scope(world, s))


# --- /b24/oauth/start/ (GET asks, POST starts) and /b24/oauth/callback/ (operators only) -------


class Operator:
    """A logged-in operator who started a reconnect of portal A, and what Bitrix24 answered."""

    def __init__(self, world, user_model):
        self.client = Client()
        self.client.force_login(
            user_model.objects.create_superuser("operator", "op@example.com", "pw-operator-123")
        )
        start = self.client.post("/b24/oauth/start/", {"portal": world.a.member_id})
        assert start.status_code == 302, start.content[:300]
        answer = requests.get(start["Location"], allow_redirects=False, timeout=10)
        assert answer.status_code == 302, answer.text[:300]
        callback = urlsplit(answer.headers["Location"])
        self.callback_query = parse_qsl(callback.query)
        query = dict(self.callback_query)
        self.state, self.code = query["state"], query["code"]


@pytest.fixture
def operator(world, django_user_model):
    return Operator(world, django_user_model)


def callback_scope(world, operator: Operator, staff: bool):
    def scope_of(sent: Sent) -> Scope | None:
        if not staff or sent.method not in ("GET", "HEAD"):
            return None
        if sent.last("state", in_query=True) != operator.state:
            return None
        if sent.last("code", in_query=True) != operator.code:
            return None
        return Scope(world.portal_a.pk)

    return scope_of


oauth_keys = keys(("portal", "state", "code", "member_id", "domain", "scope", "server_domain"))
oauth_values = st.one_of(
    values, wild_text, st.sampled_from(["member_a", "member_b"]).map(Real), mutated_real
)


@FUZZ
@given(
    staff=st.booleans(),
    method=st.sampled_from(["GET"] * 6 + ["POST", "HEAD", "PUT"]),
    query=st.one_of(
        st.tuples(oauth_values, query_of(oauth_keys, oauth_values, max_size=3)).map(
            lambda pq: [("portal", pq[0]), *pq[1]]
        ),
        query_of(oauth_keys, oauth_values, max_size=5),
    ),
    extra=headers,
)
@example(staff=True, method="GET", query=[("portal", "\x00")], extra={})
def test_oauth_start_redirects_only_operators_and_changes_nothing(
    world, operator, staff, method, query, extra
):
    """Operators and anonymous visitors with random `portal` values (genuine, spoilt, NUL)."""
    client = operator.client if staff else world.anonymous
    sent = Sent(
        method,
        "/b24/oauth/start/",
        world.resolve_pairs(query),
        b"",
        CONTENT_TYPES[0],
        {name: world.resolve(value) for name, value in extra.items()},
    )
    exchange(world, client, sent, lambda s: None)


@FUZZ
@given(
    staff=st.booleans(),
    method=st.sampled_from(["GET"] * 6 + ["POST", "HEAD"]),
    mutation=st.one_of(
        mutations.map(lambda m: ("query", *m[1:])),
        query_of(oauth_keys, oauth_values, max_size=5),
    ),
)
def test_oauth_callback_needs_the_started_state_and_a_genuine_code(
    world, operator, staff, method, mutation
):
    """The genuine callback of a started reconnect with one field mutated, or random queries:
    only the operator's own state with Bitrix24's code reconnects anything."""
    if isinstance(mutation, tuple):
        query, _ = apply_mutation(world, list(operator.callback_query), [], mutation)
    else:
        query = world.resolve_pairs(mutation)
    client = operator.client if staff else world.anonymous
    sent = Sent(method, "/b24/oauth/callback/", query, b"", CONTENT_TYPES[0], {})
    exchange(world, client, sent, callback_scope(world, operator, staff))


# --- every endpoint: what arrives before the app's code runs -----------------------------------

ALL_PATHS = (
    "/healthz",
    "/b24/install/",
    "/b24/events/",
    "/b24/app/",
    "/b24/app/task/",
    "/b24/app/results/add/",
    "/b24/app/results/1/edit/",
    "/b24/app/results/1/delete/",
    "/b24/app/changes/",
    "/b24/app/changes/1/retry/",
    "/b24/app/session/",
    "/b24/app/rebind/",
    "/b24/oauth/start/",
    "/b24/oauth/callback/",
    "/b24/no-such-page/",
)


@FUZZ
@given(
    path=st.sampled_from(ALL_PATHS),
    method=methods,
    host=st.none() | hosts,
    query=st.one_of(query_of(keys(FRAME_QUERY + ("portal", "state", "code"))), many_fields),
    body=st.one_of(pairs_of(keys(INSTALL_FIELDS + FRAME_FIELDS)), raw_bodies, huge.map(str.encode)),
    content_type=st.sampled_from(CONTENT_TYPES) | latin1_text,
)
@example(  # >1000 query fields and a charset: Django parses the query while building the request
    path="/healthz",
    method="GET",
    host=None,
    query=[("a", "")] * 1001,
    body=b"x",  # the test client sends no Content-Type without a body
    content_type="text/plain; charset=utf-8",
)
@example(path="/b24/app/", method="POST", host="evil.example", query=[], body=b"", content_type="")
@example(path="/b24/install/", method="POST", host="", query=[], body=b"x", content_type="")
@example(  # a refusal to HEAD, framable by the portal its query names, and no body to show
    path="/b24/app/task/",
    method="HEAD",
    host=None,
    query=[("DOMAIN", "portal.bitrix24.com")],
    body=b"",
    content_type="",
)
def test_any_endpoint_handles_odd_hosts_sizes_and_content_types(
    world, path, method, host, query, body, content_type
):
    """No credential here: the Host header, >1000 query fields, charsets and sizes."""
    sent = Sent(
        method,
        path,
        world.resolve_pairs(query),
        world.resolve_body(body),
        content_type,
        {} if host is None else {"HTTP_HOST": host},
    )
    exchange(world, world.anonymous, sent, lambda s: None)
