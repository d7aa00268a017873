"""Bad input to the embedded screen never breaks it (no 5xx) and never reaches another tenant.

Two fake portals, A and B, both install the app; each has task 1 (ids coincide across portals,
as they do in Bitrix24) with results whose texts are secrets of that portal. Placement POSTs
(`/b24/app/`) and frame requests (the signed frame token) are fed forged, tampered, expired and
garbage input: a deterministic generated corpus (hypothesis is not installed) of a few hundred
cases. Whatever happens, the other tenant's texts are never shown and nothing of its data, nor any
result, changes.
"""

from __future__ import annotations

import json
import random
import time

import pytest
from django.conf import settings
from django.core import signing
from django.test import Client

from b24app.portals import frame
from b24app.portals.models import Account, Portal
from results.models import ResultChange
from tests.support.portals import post_frame
from tests.support.results import (
    UNLIMITED,
    acting_user,
    edit,
    frame_get,
    frame_post,
    html,
    installed,
    open_screen,
    writes,
)

pytestmark = pytest.mark.django_db

ANNA, BORIS = 1, 2
A_SECRETS = ("alpha-secret-anna", "alpha-secret-boris")
B_SECRETS = ("bravo-secret-one", "bravo-secret-two", "bravo-secret-task-two")
BIG = "x" * 10_240


class Tenants:
    def __init__(self, fake, a, b, task_a, task_b, task_b2, results_a, results_b):
        self.fake, self.a, self.b = fake, a, b
        self.task_a, self.task_b, self.task_b2 = task_a, task_b, task_b2
        self.results_a, self.results_b = results_a, results_b

    def snapshot_b(self):
        """Everything of tenant B that A's traffic must never change."""
        portal = Portal.objects.get(member_id=self.b.member_id)
        accounts = sorted(
            Account.objects.filter(portal=portal).values_list(
                "user_id",
                "token_version",
                "access_token_encrypted",
                "refresh_token_encrypted",
                "state",
            )
        )
        return (
            (portal.domain, portal.client_endpoint, portal.state, portal.application_token_hash),
            accounts,
            [(task, self.b.results(task)) for task in (self.task_b, self.task_b2)],
        )


@pytest.fixture
def tenants(client, fake, portal, settings):
    """Portal A (the `portal` fixture: Anna 1, Boris 2) and portal B (Viktor 1, Galina 2), both
    installed, each with task 1; B also has task 2, which A does not."""
    settings.B24_RATE_LIMIT = UNLIMITED  # hundreds of requests: not a rate-limit test
    b = fake.add_portal()
    b.add_user(name="Viktor", last_name="Orlov", admin=True)
    b.add_user(name="Galina", last_name="Sokolova")
    for each in (portal, b):
        each.set_rate_limit(100_000, 100_000.0)
        installed(client, each, 1)
    task_a = portal.add_task(title="A's task")
    results_a = [
        portal.add_result(task_a, author_id=ANNA, text=A_SECRETS[0]),
        portal.add_result(task_a, author_id=BORIS, text=A_SECRETS[1]),
    ]
    task_b = b.add_task(title="B's task")
    task_b2 = b.add_task(title="B's second task")
    results_b = [
        b.add_result(task_b, author_id=1, text=B_SECRETS[0]),
        b.add_result(task_b, author_id=2, text=B_SECRETS[1]),
        b.add_result(task_b2, author_id=2, text=B_SECRETS[2]),
    ]
    assert task_a == task_b == 1 and results_a[0] == results_b[0] == 1
    return Tenants(fake, portal, b, task_a, task_b, task_b2, results_a, results_b)


@pytest.fixture
def lenient_client():
    """A test client that returns a 500 page instead of raising, so a crash is a status."""
    return Client(raise_request_exception=False)


def _shows_b(response) -> list[str]:
    body = response.content.decode(errors="replace")
    return [secret for secret in B_SECRETS if secret in body]


# --- placement POSTs (`/b24/app/`) -------------------------------------------------------------

OPTION_VALUES = [
    "",
    "not json",
    "{",
    "[]",
    "[1, 2]",
    '"1"',
    "null",
    "true",
    "1",
    "-1",
    "1e999",
    "{}",
    '{"taskId": 1}',
    '{"taskId": "1"}',
    '{"taskId": "2"}',
    '{"taskId": "-1"}',
    '{"taskId": -1}',
    '{"taskId": "0"}',
    '{"taskId": "00001"}',
    '{"taskId": " 1 "}',
    '{"taskId": "1.0"}',
    '{"taskId": "1e3"}',
    '{"taskId": 1e308}',
    '{"taskId": "99999999999999999999999999999999"}',
    '{"taskId": 99999999999999999999999999999999}',
    '{"taskId": "9223372036854775808"}',
    '{"taskId": null}',
    '{"taskId": true}',
    '{"taskId": [1]}',
    '{"taskId": {"id": 1}}',
    '{"taskId": "1; DROP TABLE results_resultchange"}',
    '{"taskId": "\\u0661"}',  # ARABIC-INDIC DIGIT ONE
    '{"taskId": "\\u00b2"}',  # SUPERSCRIPT TWO: str.isdigit() but not int()
    '{"taskId": "\\u2460"}',  # CIRCLED DIGIT ONE
    '{"taskId": "\\uff11"}',  # FULLWIDTH DIGIT ONE
    '{"taskId": "\\ud800"}',  # a lone surrogate
    '{"taskId": "задача"}',
    '{"ID": "1"}',
    '{"ID": "\\u00b2"}',
    '{"URI": "/company/personal/user/1/tasks/task/view/2/"}',
    json.dumps({"taskId": BIG}),
    json.dumps({"taskId": "1", "pad": BIG}),
    json.dumps({BIG: "1"}),
    "[" * 10_240,
    '{"a":' * 5_000 + "1" + "}" * 5_000,
    BIG,
    "\x00\x01\x02",
]

PLACEMENTS = [
    "TASK_VIEW_TAB",
    "TASK_VIEW_SIDEBAR",
    "TASK_VIEW_TOP_PANEL",
    "TASK_LIST_CONTEXT_MENU",
    "DEFAULT",
    "task_view_tab",
    "CRM_DEAL_DETAIL_TAB",
    "",
    "ЗАДАЧА",
    BIG,
]


def _owner(fake, access_token: str) -> tuple[str, int] | None:
    with fake.lock:
        token = fake.access_tokens.get(access_token)
        return (token.member_id, token.user_id) if token is not None else None


def _placement_corpus(t: Tenants) -> list[tuple[str, str, dict]]:
    """(label, url, form) cases built from genuine frame POSTs of A and B."""
    url_a, base_a = t.a.frame_post(BORIS, options={"taskId": "1"})
    url_b, base_b = t.b.frame_post(2, options={"taskId": "1"})
    cases: list[tuple[str, str, dict]] = []
    b_values = {base_b["AUTH_ID"], base_b["APPLICATION_TOKEN"], t.b.member_id}

    def case(label, fields=None, url=url_a, **changes):
        form = dict(base_a if fields is None else fields)
        for key, value in changes.items():
            if value is None:
                form.pop(key, None)
            else:
                form[key] = value
        cases.append((label, url, form))

    def crosses(url, form) -> bool:
        """Carries something of B's (mixing two of them could make a genuine B request)."""
        return url == url_b or bool(b_values & set(form.values()))

    for key in base_a:
        case(f"missing {key}", **{key: None})
        case(f"empty {key}", **{key: ""})
        case(f"10 kB {key}", **{key: BIG})
        case(f"unicode {key}", **{key: "Ünïcödé ✓ 𝔘"})
    for n, options in enumerate(OPTION_VALUES):
        case(f"options #{n}", PLACEMENT_OPTIONS=options)
        case(f"menu options #{n}", PLACEMENT="TASK_LIST_CONTEXT_MENU", PLACEMENT_OPTIONS=options)
    for placement in PLACEMENTS:
        case(f"placement {placement[:20]!r}", PLACEMENT=placement)
    # Another portal's member_id with this portal's tokens (with A's or B's application token).
    case("B member_id, A tokens", member_id=t.b.member_id)
    case(
        "B member_id and application token, A tokens",
        member_id=t.b.member_id,
        APPLICATION_TOKEN=base_b["APPLICATION_TOKEN"],
    )
    case(
        "B member_id, app token, domain; A tokens",
        url=url_b,
        member_id=t.b.member_id,
        APPLICATION_TOKEN=base_b["APPLICATION_TOKEN"],
    )
    case("A member_id, B tokens", AUTH_ID=base_b["AUTH_ID"], REFRESH_ID=base_b["REFRESH_ID"])
    case("A form on B's domain", url=url_b)
    case("upper-case member_id", member_id=t.a.member_id.upper())
    case("unknown member_id", member_id="0" * 32)
    case("non-hex member_id", member_id="' OR 1=1 --")
    # Forged APPLICATION_TOKEN with a bad AUTH_ID, and each alone.
    for app_token in ("0" * 32, "", base_b["APPLICATION_TOKEN"], base_a["APPLICATION_TOKEN"]):
        for auth in ("bad-auth", "0" * 64, base_b["AUTH_ID"], ""):
            case(
                f"app token {app_token[:6]!r} auth {auth[:6]!r}",
                APPLICATION_TOKEN=app_token,
                AUTH_ID=auth,
            )
    for endpoint in (
        "http://attacker.example/rest/",
        t.b.url + "/rest/",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/",
        "javascript:alert(1)",
    ):
        case(f"server endpoint {endpoint[:20]}", SERVER_ENDPOINT=endpoint)
    for query in (
        "DOMAIN=attacker.example&LANG=en",
        "DOMAIN=&LANG=ru",
        f"DOMAIN={t.b.domain}&LANG=en",
        "LANG=" + "x" * 5000,
        "LANG=%D1%80%D1%83&DOMAIN=%00",
        "",
    ):
        case(f"query {query[:20]!r}", url="http://testserver/b24/app/?" + query)
    for expires in ("-1", "0", "1e99", "abc", "99999999999999999999", BIG):
        case(f"expires {expires[:10]!r}", AUTH_EXPIRES=expires)
    # Random combinations of the single mutations above (deterministic seed), at most one of
    # them carrying something of B's.
    rng = random.Random(20261128)
    own = [c for c in cases if not crosses(c[1], c[2])]
    cross = [c for c in cases if crosses(c[1], c[2])]
    for n in range(200):
        picks = rng.sample(own, rng.randint(1, 3)) + rng.sample(cross, n % 2)
        form = dict(base_a)
        url = url_a
        for _, pick_url, pick_form in picks:
            url = pick_url if pick_url != url_a else url
            for key in set(base_a) | set(pick_form):
                if pick_form.get(key) != base_a.get(key):
                    if key in pick_form:
                        form[key] = pick_form[key]
                    else:
                        form.pop(key, None)
        cases.append((f"combo #{n}: " + " + ".join(p[0] for p in picks), url, form))
    return cases


def test_screen_placement_post_fuzz_never_5xx_and_never_crosses_tenants(
    fake, tenants, lenient_client
):
    t = tenants
    b_before = t.snapshot_b()
    a_portal = Portal.objects.get(member_id=t.a.member_id)
    corpus = _placement_corpus(t)
    assert len(corpus) >= 300
    crashes, leaks, wrong_sessions = [], [], []

    for label, url, form in corpus:
        response = post_frame(lenient_client, url, form)
        if response.status_code >= 500:
            crashes.append((label[:120], response.status_code))
            continue
        if _shows_b(response):
            leaks.append(label[:120])
        if response.status_code == 200 and 'data-frame-token="' in html(response):
            session = frame.read(html(response).split('data-frame-token="')[1].split('"')[0])
            account = Account.objects.select_related("portal").get(pk=session.account_id)
            owner = _owner(fake, str(form.get("AUTH_ID", "")))
            if (account.portal.member_id, account.user_id) != owner:
                wrong_sessions.append(label[:120])

    assert not leaks, f"B's results shown for: {leaks}"
    assert not wrong_sessions, f"a frame session for someone else: {wrong_sessions}"
    assert t.snapshot_b() == b_before
    assert set(Account.objects.filter(portal=a_portal).values_list("user_id", flat=True)) <= {
        ANNA,
        BORIS,
    }
    assert Portal.objects.count() == 2
    assert not ResultChange.objects.exists()
    assert writes(t.a) == [] and writes(t.b) == []
    assert not crashes, f"{len(crashes)} of {len(corpus)} placement POSTs gave a 5xx: {crashes}"


# --- frame tokens -----------------------------------------------------------------------------


class _SignedAt(signing.TimestampSigner):
    def __init__(self, at: float, **kwargs):
        super().__init__(**kwargs)
        self._at = at

    def timestamp(self):
        return signing.b62_encode(int(self._at))


def _token(payload, *, at: float | None = None, salt=frame.SALT, key=None) -> str:
    key = key or settings.B24_FRAME_SIGNING_KEY
    signer = _SignedAt(time.time() if at is None else at, key=key, salt=salt)
    return signer.sign_object(payload, compress=False)


def _flip(text: str, index: int) -> str:
    char = text[index]
    return text[:index] + ("A" if char != "A" else "B") + text[index + 1 :]


def _frame_calls(t: Tenants):
    """(label, method, path, data) of every frame endpoint, aimed at A's task and result."""
    task, result = t.task_a, t.results_a[1]
    return [
        ("task", "get", f"/b24/app/task/?task={task}", None),
        ("add", "post", "/b24/app/results/add/", {"task": task, "text": "injected"}),
        ("edit", "post", f"/b24/app/results/{result}/edit/", {"task": task, "text": "hijack"}),
        ("delete", "post", f"/b24/app/results/{result}/delete/", {"task": task}),
        ("changes", "get", "/b24/app/changes/?ids=1,2,3", None),
        ("retry", "post", "/b24/app/changes/1/retry/", {}),
    ]


def _call(client, method, path, data, token, *, as_field=False, as_json=False):
    extra = {"HTTP_ACCEPT": "application/json"} if as_json else {}
    if as_field:
        if method == "get":
            return client.get(path, {"frame_token": token}, **extra)
        return client.post(path, {**(data or {}), "frame_token": token}, **extra)
    extra["HTTP_X_FRAME_TOKEN"] = token
    if method == "get":
        return client.get(path, **extra)
    return client.post(path, data or {}, **extra)


def _bad_tokens(t: Tenants, good: str) -> list[tuple[str, str, int, str]]:
    """(label, token, expected status, expected error code)."""
    a = Portal.objects.get(member_id=t.a.member_id)
    boris = Account.objects.get(portal=a, user_id=BORIS)
    b_account = Account.objects.get(portal__member_id=t.b.member_id, user_id=1)
    payload = {"p": a.pk, "a": boris.pk, "l": "en"}
    now = time.time()
    value, _, signature = good.rpartition(":")
    bad = [
        (
            "expired by a second",
            _token(payload, at=now - frame.TTL_SECONDS - 1),
            401,
            "frame_expired",
        ),
        ("expired a day ago", _token(payload, at=now - 86_400), 401, "frame_expired"),
        ("expired a year ago", _token(payload, at=now - 365 * 86_400), 401, "frame_expired"),
        ("other salt", _token(payload, salt="another.salt"), 403, "frame_invalid"),
        ("default salt", signing.dumps(payload), 403, "frame_invalid"),
        ("other key", _token(payload, key="not-the-secret-key-0123456789"), 403, "frame_invalid"),
        ("A's portal, B's account", _token({**payload, "a": b_account.pk}), 403, "frame_gone"),
        (
            "B's portal, A's account",
            _token({**payload, "p": b_account.portal_id}),
            403,
            "frame_gone",
        ),
        ("unknown account", _token({**payload, "a": 10**9}), 403, "frame_gone"),
        ("negative ids", _token({"p": -1, "a": -1, "l": "en"}), 403, "frame_gone"),
        ("string ids", _token({"p": "x", "a": "y", "l": "en"}), 403, "frame_invalid"),
        ("no account", _token({"p": a.pk, "l": "en"}), 403, "frame_invalid"),
        ("list payload", _token([a.pk, boris.pk]), 403, "frame_invalid"),
        ("string payload", _token("admin"), 403, "frame_invalid"),
        ("truncated", good[:-1], 403, "frame_invalid"),
        ("extended", good + "x", 403, "frame_invalid"),
        ("signature only", signature, 403, "frame_invalid"),
        ("payload only", value, 403, "frame_invalid"),
        ("empty", "", 403, "frame_invalid"),
        ("colons", ":::", 403, "frame_invalid"),
        ("10 kB", BIG, 403, "frame_invalid"),
        ("unicode", "токен:✓:𝔘", 403, "frame_invalid"),
        ("nul", "\x00", 403, "frame_invalid"),
    ]
    for index in range(0, len(good), max(1, len(good) // 12)):
        if good[index] != ":":
            bad.append((f"flipped char {index}", _flip(good, index), 403, "frame_invalid"))
    return bad


def test_frame_endpoints_refuse_expired_tampered_and_forged_tokens(fake, tenants, lenient_client):
    t = tenants
    _, good = open_screen(lenient_client, t.a, BORIS, t.task_a)
    b_before = t.snapshot_b()
    requests_before = (len(t.a.requests), len(t.b.requests))
    outcomes = []

    for label, token, status, code in _bad_tokens(t, good):
        for endpoint, method, path, data in _frame_calls(t):
            for as_field in (False, True) if method == "post" else (False,):
                response = _call(
                    lenient_client, method, path, data, token, as_field=as_field, as_json=True
                )
                outcomes.append((label, endpoint, as_field, response.status_code))
                if response.status_code >= 500 or response.status_code == 200:
                    continue
                body = response.json()
                assert response.status_code == status, (label, endpoint, body)
                if code:
                    assert body["error"] == code, (label, endpoint, body)
                assert not _shows_b(response) and A_SECRETS[0] not in html(response)

    assert not [o for o in outcomes if o[3] >= 500], "5xx for a bad frame token"
    assert not [o for o in outcomes if o[3] == 200], "a bad frame token was accepted"
    # Refused before anything was read from or sent to either portal, or written.
    assert (len(t.a.requests), len(t.b.requests)) == requests_before
    assert not ResultChange.objects.exists()
    assert t.snapshot_b() == b_before


def test_frame_expired_token_in_html_screen_asks_to_reopen(client, tenants):
    t = tenants
    a = Portal.objects.get(member_id=t.a.member_id)
    anna = Account.objects.get(portal=a, user_id=ANNA)
    expired = _token({"p": a.pk, "a": anna.pk, "l": "en"}, at=time.time() - frame.TTL_SECONDS - 5)

    response = frame_get(client, expired, f"/b24/app/task/?task={t.task_a}")

    assert response.status_code == 401
    assert "expired" in html(response) and "Reopen the app" in html(response)
    assert A_SECRETS[0] not in html(response)


# --- frame requests with a genuine token -------------------------------------------------------

TASK_PARAMS = [
    "",
    "0",
    "-1",
    "1.5",
    "1e3",
    " 1",
    "0x1",
    "99999999999999999999",
    "9" * 5_000,
    "\u0661",
    "\u00b2",
    "\u2460",
    "\uff11",
    "1 OR 1=1",
    "задача",
    "%00",
    BIG,
]
IDS_PARAMS = ["", ",,,", "1,a,2", "-1", "\u00b2", "\u00b2,1", "1" * 5_000, ",".join(["1"] * 5_000)]


def test_frame_endpoints_bad_parameters_never_5xx_nor_send_anything_odd(
    fake, tenants, lenient_client
):
    t = tenants
    _, token = open_screen(lenient_client, t.a, BORIS, t.task_a)
    b_before = t.snapshot_b()
    crashes = []

    def check(label, response):
        if response.status_code >= 500:
            crashes.append((label, response.status_code))
        assert not _shows_b(response), label

    for value in TASK_PARAMS:
        for as_json in (False, True):
            check(
                f"task={value[:12]!r}",
                lenient_client.get(
                    "/b24/app/task/",
                    {"task": value},
                    HTTP_X_FRAME_TOKEN=token,
                    **({"HTTP_ACCEPT": "application/json"} if as_json else {}),
                ),
            )
        check(
            f"add task={value[:12]!r}",
            frame_post(
                lenient_client, token, "/b24/app/results/add/", {"task": value, "text": "x"}
            ),
        )
        check(
            f"edit task={value[:12]!r}",
            frame_post(
                lenient_client,
                token,
                f"/b24/app/results/{t.results_a[1]}/edit/",
                {"task": value, "text": "x"},
            ),
        )
    for value in IDS_PARAMS:
        check(
            f"ids={value[:12]!r}",
            lenient_client.get("/b24/app/changes/", {"ids": value}, HTTP_X_FRAME_TOKEN=token),
        )
    for text in (BIG, "x" * 10_001, "<script>alert(1)</script>", "😀" * 3000, "\u202e\u200b"):
        check(
            f"text {text[:8]!r}",
            frame_post(
                lenient_client,
                token,
                "/b24/app/results/add/",
                {"task": t.task_a, "text": text},
            ),
        )
    for path in (
        "/b24/app/results/0/edit/",
        "/b24/app/results/0/delete/",
        "/b24/app/changes/0/retry/",
        f"/b24/app/changes/{10**12}/retry/",
    ):
        check(path, frame_post(lenient_client, token, path, {"task": t.task_a, "text": "x"}))
    # (ids beyond 64 bits break the test's own transaction: see test_frame_odd_numbers_...)

    assert t.snapshot_b() == b_before
    for request in writes(t.a):
        assert acting_user(fake, request) == BORIS
        fields = request["body"].get("fields", {})
        assert set(fields) <= {"taskId", "text"}
        if "taskId" in fields:
            assert fields["taskId"] == t.task_a
    assert not crashes, f"5xx for frame requests with odd parameters: {crashes}"


@pytest.mark.parametrize(
    "where, value",
    [
        # str.isdigit() is True for these, int() refuses them
        pytest.param("placement taskId", "\u00b2", id="placement-taskId-superscript-two"),
        pytest.param("placement taskId", "\u2460", id="placement-taskId-circled-one"),
        pytest.param("placement ID", "\u00b2", id="menu-placement-ID-superscript-two"),
        pytest.param("task query", "\u00b2", id="task-query-superscript-two"),
        pytest.param("add task field", "\u2460", id="add-task-field-circled-one"),
        pytest.param("changes ids", "\u00b2", id="changes-ids-superscript-two"),
        # json.loads raises RecursionError (not ValueError) for deep nesting
        pytest.param("placement options", "[" * 2_000, id="placement-options-deeply-nested"),
        # int() refuses more than 4300 digits (ValueError)
        pytest.param("changes ids", "1" * 5_000, id="changes-ids-5000-digits"),
        # the URL's <int:…> accepts any digits; the database does not
        pytest.param("edit result id", "9" * 23, id="edit-result-id-beyond-64-bits"),
        pytest.param("delete result id", "9" * 23, id="delete-result-id-beyond-64-bits"),
        pytest.param("retry change id", "9" * 23, id="retry-change-id-beyond-64-bits"),
        # PostgreSQL text cannot hold NUL: it must be refused (or removed) before the insert
        pytest.param("add text", "before\x00after", id="add-text-with-nul"),
        pytest.param("edit text_before", "\x00", id="edit-text-before-with-nul"),
    ],
)
def test_frame_odd_numbers_are_refused_cleanly(tenants, lenient_client, where, value):
    """Each input one bug: the app must answer 4xx (or ignore it), never crash with a 500."""
    t = tenants
    _, token = open_screen(lenient_client, t.a, BORIS, t.task_a)
    if where.startswith("placement"):
        placement, options = "TASK_VIEW_TAB", {"taskId": value}
        if where == "placement ID":
            placement, options = "TASK_LIST_CONTEXT_MENU", {"ID": value}
        url, form = t.a.frame_post(BORIS, placement=placement)
        form["PLACEMENT_OPTIONS"] = value if where == "placement options" else json.dumps(options)
        response = post_frame(lenient_client, url, form)
    elif where == "task query":
        response = lenient_client.get("/b24/app/task/", {"task": value}, HTTP_X_FRAME_TOKEN=token)
    elif where == "add task field":
        response = frame_post(
            lenient_client, token, "/b24/app/results/add/", {"task": value, "text": "x"}
        )
    elif where == "add text":
        response = frame_post(
            lenient_client, token, "/b24/app/results/add/", {"task": t.task_a, "text": value}
        )
    elif where == "edit text_before":
        response = frame_post(
            lenient_client,
            token,
            f"/b24/app/results/{t.results_a[1]}/edit/",
            {"task": t.task_a, "text": "new", "text_before": value},
        )
    elif where == "changes ids":
        response = lenient_client.get("/b24/app/changes/", {"ids": value}, HTTP_X_FRAME_TOKEN=token)
    else:
        path = {
            "edit result id": f"/b24/app/results/{value}/edit/",
            "delete result id": f"/b24/app/results/{value}/delete/",
            "retry change id": f"/b24/app/changes/{value}/retry/",
        }[where]
        response = frame_post(lenient_client, token, path, {"task": t.task_a, "text": "x"})

    assert response.status_code < 500, (where, response.status_code)
    assert writes(t.b) == []
    for request in writes(t.a):  # only the two text cases may send anything, as Boris
        assert where in ("add text", "edit text_before")
        assert request["status"] == 200
        assert request["body"]["fields"]["text"] in ("before\x00after", "beforeafter", "new")


# --- tenants and users -------------------------------------------------------------------------


def _first_pages(portal) -> int:
    """How many listings of results the portal served (the calls asking for offset 0)."""
    return sum(
        1
        for call in portal.calls("tasks.task.result.list")
        if call["body"].get("pagination", {}).get("offset") == 0
    )


def test_frame_token_of_portal_a_asks_portal_a_even_for_b_task_ids(client, tenants):
    t = tenants
    _, token = open_screen(client, t.a, ANNA, t.task_a)
    b_requests = len(t.b.requests)
    a_lists = _first_pages(t.a)

    same_id = frame_get(client, token, f"/b24/app/task/?task={t.task_b}", as_json=True)
    only_b = frame_get(client, token, f"/b24/app/task/?task={t.task_b2}", as_json=True)
    page = frame_get(client, token, f"/b24/app/task/?task={t.task_b2}")

    assert same_id.status_code == 200
    assert A_SECRETS[0] in same_id.json()["html"]  # task 1 of A, the token's portal
    assert not _shows_b(same_id) and not _shows_b(only_b) and not _shows_b(page)
    assert only_b.status_code in (403, 404)
    assert _first_pages(t.a) == a_lists + 3  # each request listed on A
    assert len(t.b.requests) == b_requests  # B was never asked


def test_frame_token_of_portal_a_cannot_change_portal_b_results(client, fake, tenants):
    t = tenants
    _, token = open_screen(client, t.a, ANNA, t.task_a)
    b_before = t.snapshot_b()
    b_only_result = t.results_b[2]  # no such result on A

    edited = edit(client, token, t.task_a, b_only_result, "cross-tenant edit")
    deleted = frame_post(
        client, token, f"/b24/app/results/{b_only_result}/delete/", {"task": t.task_b2}
    )

    assert "Not saved" in html(edited) and "Not saved" in html(deleted)
    assert writes(t.b) == []
    assert [r["status"] for r in writes(t.a)] == [403, 403]  # A was asked, and refused
    assert t.snapshot_b() == b_before


def test_frame_token_cannot_see_or_retry_other_peoples_changes(client, fake, tenants):
    t = tenants
    # Galina on B and Boris on A each make a change that Bitrix24 refuses.
    _, galina = open_screen(client, t.b, 2, t.task_b)
    edit(client, galina, t.task_b, t.results_b[0], "Galina edits Viktor's result")
    b_change = ResultChange.objects.get(portal__member_id=t.b.member_id)
    _, boris = open_screen(client, t.a, BORIS, t.task_a)
    edit(client, boris, t.task_a, t.results_a[0], "Boris edits Anna's result")
    a_change = ResultChange.objects.get(portal__member_id=t.a.member_id)
    assert {b_change.state, a_change.state} == {ResultChange.State.FAILED}
    _, anna = open_screen(client, t.a, ANNA, t.task_a)
    sent = len(writes(t.a)) + len(writes(t.b))

    for token, change in ((anna, b_change), (anna, a_change), (boris, b_change)):
        listed = frame_get(client, token, f"/b24/app/changes/?ids={change.pk}").json()
        retried = frame_post(client, token, f"/b24/app/changes/{change.pk}/retry/")
        assert listed == {"changes": []}
        assert retried.status_code == 404
        stored = ResultChange.objects.get(pk=change.pk)
        assert (stored.state, stored.attempts) == (ResultChange.State.FAILED, 1)

    assert len(writes(t.a)) + len(writes(t.b)) == sent


def test_frame_token_of_user_x_cannot_edit_or_delete_user_ys_result(client, fake, tenants):
    t = tenants
    annas = t.results_a[0]
    response, token = open_screen(client, t.a, BORIS, t.task_a)
    # Boris's screen offers no Edit or Delete for Anna's result (rights come from Bitrix24).
    item = html(response).split(f'data-result-id="{annas}"')[1].split("</li>")[0]
    assert 'data-action="edit"' not in item and 'data-action="delete"' not in item

    edited = edit(client, token, t.task_a, annas, "Boris was here")
    deleted = frame_post(client, token, f"/b24/app/results/{annas}/delete/", {"task": t.task_a})

    for response in (edited, deleted):
        assert "Not saved" in html(response)
        assert "only its author can" in html(response)
    assert [(acting_user(fake, r), r["status"]) for r in writes(t.a)] == [
        (BORIS, 403),
        (BORIS, 403),
    ]
    assert {i["id"]: i["text"] for i in t.a.results(t.task_a)} == {
        t.results_a[0]: A_SECRETS[0],
        t.results_a[1]: A_SECRETS[1],
    }
