"""Lazy, race-free token refresh against the fake OAuth server (single-use refresh tokens)."""

import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from b24app.portals import services
from b24app.portals.bitrix import BitrixAuthError, BitrixError, BitrixUnavailable, TokenSet
from b24app.portals.models import Account, Portal
from tests.appserver import free_port
from tests.support.portals import install, post_frame

ROOT = Path(__file__).resolve().parents[2]


def _refresh_calls(fake):
    return [call for call in fake.token_calls if call["grant_type"] == "refresh_token"]


@pytest.fixture
def installed(client, portal):
    assert install(client, portal).status_code == 200
    return Account.objects.select_related("portal").get(user_id=1)


@pytest.mark.django_db
def test_refresh_on_expired_token_once_then_retries(fake, portal, installed):
    portal.expire_access_tokens()
    version = installed.token_version
    profile = services.account_client(installed).call("profile")
    assert profile["ID"] == "1"
    assert len(_refresh_calls(fake)) == 1
    account = Account.objects.get(pk=installed.pk)
    assert account.token_version == version + 1
    assert account.last_refreshed_at is not None
    assert account.access_token != installed.access_token
    assert account.refresh_token != installed.refresh_token


@pytest.mark.django_db
def test_refresh_when_expiry_has_passed_before_calling(fake, portal, installed):
    Account.objects.filter(pk=installed.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    account = Account.objects.select_related("portal").get(pk=installed.pk)
    assert services.account_client(account).call("profile")["ID"] == "1"
    assert len(_refresh_calls(fake)) == 1
    assert len([c for c in portal.calls("profile") if c["status"] == 401]) == 0


@pytest.mark.django_db
def test_refresh_stale_version_uses_the_winners_tokens(fake, portal, installed):
    seen = installed.token_version
    services.account_tokens_refresh(account_id=installed.pk, seen_version=seen)
    again = services.account_tokens_refresh(account_id=installed.pk, seen_version=seen)
    assert again.token_version == seen + 1
    assert len(_refresh_calls(fake)) == 1


@pytest.mark.django_db
def test_refresh_dead_token_blocks_account_and_installers_portal(fake, portal, installed):
    portal.expire_access_tokens()
    portal.revoke_refresh_tokens()
    with pytest.raises(BitrixAuthError):
        services.account_client(installed).call("profile")
    account = Account.objects.get(pk=installed.pk)
    assert account.state == Account.State.BLOCKED
    assert "invalid_grant" in account.state_reason
    assert "invalid_grant" in account.last_refresh_error
    stored = Portal.objects.get(pk=installed.portal_id)
    assert stored.state == Portal.State.BLOCKED and "invalid_grant" in stored.state_reason
    # A blocked account is not sent to the OAuth server again.
    calls = len(fake.token_calls)
    with pytest.raises(BitrixAuthError):
        services.account_client(account)
    assert len(fake.token_calls) == calls


# --- the OAuth server failing: transient faults block nobody, cost at most one extra call -------

TRANSIENT_TOKEN_FAULTS = ["timeout", "500", "502", "drop", "lost_response"]


@pytest.fixture
def short_read_timeout(settings, fake):
    """A read timeout the fake's `timeout` fault outlasts, so the client really times out."""
    settings.B24_HTTP_READ_TIMEOUT = 0.5
    fake.timeout_delay_s = 2.0


@pytest.mark.django_db
@pytest.mark.parametrize("fault", TRANSIENT_TOKEN_FAULTS)
def test_refresh_transient_fault_blocks_nobody_and_costs_one_call_at_most(
    fake, portal, installed, short_read_timeout, fault
):
    """`lost_response` is the hard one: the server rotated the refresh token and the answer
    never came, so the retry's `invalid_grant` is our own lost renewal, not a revocation."""
    portal.expire_access_tokens()
    fake.fail_token_next(count=1, error=fault)
    with pytest.raises(BitrixUnavailable):
        services.account_client(installed).call("profile")
    account = Account.objects.get(pk=installed.pk)
    assert account.state == Account.State.ACTIVE
    assert account.refresh_unconfirmed_at is not None
    assert account.last_refresh_error.endswith("temporary, will retry")

    # The caller retries (a web request again, or Celery's backoff).
    if fault == "lost_response":
        with pytest.raises(services.AccountAwaitingSignIn):
            services.account_client(account).call("profile")
        account = Account.objects.get(pk=installed.pk)
        assert account.state == Account.State.WAITING
        # Later calls ask the OAuth server nothing more.
        with pytest.raises(services.AccountAwaitingSignIn):
            services.account_client(account).call("profile")
    else:
        assert services.account_client(account).call("profile")["ID"] == "1"
        account = Account.objects.get(pk=installed.pk)
        assert account.state == Account.State.ACTIVE and account.refresh_unconfirmed_at is None
    assert len(_refresh_calls(fake)) == 2  # the failed one and one more, never a third
    stored = Portal.objects.get(pk=installed.portal_id)
    assert stored.state == Portal.State.ACTIVE  # the installer's portal is not blocked


@pytest.mark.django_db
def test_refresh_waiting_account_is_given_access_back_by_its_users_next_visit(
    client, fake, portal, installed
):
    portal.expire_access_tokens()
    fake.fail_token_next(count=1, error="lost_response")
    for _ in range(2):
        with pytest.raises(BitrixUnavailable):
            services.account_client(Account.objects.get(pk=installed.pk)).call("profile")
    assert Account.objects.get(pk=installed.pk).state == Account.State.WAITING

    task = portal.add_task(title="Report", created_by=1, responsible_id=1)
    url, fields = portal.frame_post(1, options={"taskId": str(task)})
    assert post_frame(client, url, fields).status_code == 200

    account = Account.objects.get(pk=installed.pk)
    assert account.state == Account.State.ACTIVE and account.refresh_unconfirmed_at is None
    assert services.account_client(account).call("profile")["ID"] == "1"


@pytest.mark.django_db
def test_refresh_invalid_grant_after_a_confirmed_refresh_still_blocks(fake, portal, installed):
    """A timeout that a later successful renewal settled leaves no doubt behind: a revocation
    after it blocks as usual."""
    portal.expire_access_tokens()
    fake.fail_token_next(count=1, error="500")
    with pytest.raises(BitrixUnavailable):
        services.account_client(installed).call("profile")
    services.account_client(Account.objects.get(pk=installed.pk)).call("profile")
    portal.expire_access_tokens()
    portal.revoke_refresh_tokens()
    with pytest.raises(BitrixAuthError):
        services.account_client(Account.objects.get(pk=installed.pk)).call("profile")
    assert Account.objects.get(pk=installed.pk).state == Account.State.BLOCKED


def _storm(
    fake, account_ids, *, processes: int, threads: int, calls: int = 1, env_extra=None, logs=None
) -> list[dict]:
    database = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": (
            f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
        ),
        "B24_OAUTH_SERVERS": fake.oauth_url,
        "B24_ALLOW_PRIVATE_PORTALS": "true",
        "DJANGO_CONN_MAX_AGE": "0",
        "STORM_CALLS": str(calls),
        **(env_extra or {}),
    }
    start_at = time.time() + 3.0
    args = [str(start_at), str(threads), *map(str, account_ids)]
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.portals.storm", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    outcomes = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-2000:]
        if logs is not None:
            logs.append(out)  # the app logs to stdout
        outcomes.extend(json.loads(out.strip().splitlines()[-1]))
    return outcomes


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_refresh_storm_one_account_fifty_callers_two_processes(client, fake, portal):
    assert install(client, portal).status_code == 200
    account = Account.objects.get(user_id=1)
    portal.expire_access_tokens()
    # 100 requests at once: this test is about tokens, not Bitrix24's request budget.
    portal.set_rate_limit(1000, 500.0)
    Portal.objects.update(rate_limit="1000/500")

    outcomes = _storm(fake, [account.pk], processes=2, threads=25)

    assert len(outcomes) == 50
    assert all(outcome.get("user") == 1 for outcome in outcomes), outcomes
    refreshes = _refresh_calls(fake)
    assert len(refreshes) == 1
    assert not [call for call in fake.token_calls if call.get("error") == "invalid_grant"]
    assert Account.objects.get(pk=account.pk).token_version == account.token_version + 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_refresh_storm_twenty_users_ten_callers_each_never_mix_tokens(client, fake, portal):
    assert install(client, portal).status_code == 200
    stored = Portal.objects.get()
    users = [portal.add_user(name=f"User {n}") for n in range(19)]
    for user_id in users:
        tokens = portal.issue_tokens(user_id)
        services.account_tokens_store(
            portal=stored,
            user_id=user_id,
            tokens=TokenSet.from_response(tokens),
        )
    accounts = {a.pk: a.user_id for a in Account.objects.all()}
    assert len(accounts) == 20
    # 400 requests in a few seconds: this test is about tokens, not Bitrix24's request budget.
    portal.set_rate_limit(1000, 500.0)
    Portal.objects.update(rate_limit="1000/500")
    portal.expire_access_tokens()

    outcomes = _storm(fake, list(accounts), processes=2, threads=100)

    assert len(outcomes) == 200
    assert all(outcome.get("user") == accounts[outcome["account"]] for outcome in outcomes), [
        o for o in outcomes if o.get("user") != accounts[o["account"]]
    ][:5]
    refreshes = _refresh_calls(fake)
    assert len(refreshes) == 20
    assert sorted(call["user_id"] for call in refreshes) == sorted(accounts.values())
    assert not [call for call in fake.token_calls if call.get("error") == "invalid_grant"]


@pytest.mark.alone
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_rate_limit_shared_by_processes_keeps_under_the_portals_bucket(client, fake, portal):
    """32 callers in 2 processes against a portal limited to 10 burst / 10 per second (Bitrix24's
    50/2, scaled up; see the next test for why not faster): the portal never answers
    QUERY_LIMIT_EXCEEDED, and the achieved steady rate is within 10% of the allowed one."""
    assert install(client, portal).status_code == 200
    account = Account.objects.get(user_id=1)
    burst, rate = 10, 10.0
    portal.set_rate_limit(burst, rate)
    Portal.objects.update(rate_limit=f"{burst}/{rate:g}")
    from b24app.portals.services import rate_limiter

    rate_limiter().reset(portal.member_id)
    first = len(portal.requests)

    outcomes = _storm(fake, [account.pk], processes=2, threads=16, calls=3)

    assert [o for o in outcomes if "error" in o] == []
    assert portal.limit_hits == 0
    times = sorted(r["time"] for r in portal.requests[first:] if r.get("method_name") == "profile")
    assert len(times) == 32 * 3
    steady = times[burst:]
    achieved = (len(steady) - 1) / (steady[-1] - steady[0])
    assert 0.9 * rate <= achieved <= 1.1 * rate, achieved
    gaps = [b - a for a, b in zip(steady, steady[1:], strict=False)]
    assert statistics.median(gaps) >= 0.8 / rate


class OwnRedis:
    """A Redis server of a test's own, so that it can be killed and started again (on the same
    port, empty, as after a crash) without touching anyone else's."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(self._directory)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.mark.alone
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_rate_limit_stays_under_the_bucket_when_redis_dies_and_comes_back(
    client, fake, portal, own_redis
):
    """Redis is killed while 4 processes of 8 callers each are sending, and started again
    (empty) 2.5 s later. Each process paces on its own meanwhile (burst 1, its share of the
    rate, after the slots Redis gave out) and goes back to Redis with the portal's bucket
    marked full, and the portal never answers QUERY_LIMIT_EXCEEDED.

    The rate is 10/s, 5 times Bitrix24's, rather than 20/s: a burst that reaches the portal late
    loses drain that pacing at the full rate never wins back, and 32 callers starting at once on
    2 CPUs are late by tens of milliseconds, which weighs 10 times more against a 20/s interval
    than against 2/s."""
    assert install(client, portal).status_code == 200
    account = Account.objects.get(user_id=1)
    burst, rate = 10, 10.0
    portal.set_rate_limit(burst, rate)
    Portal.objects.update(rate_limit=f"{burst}/{rate:g}")
    first = len(portal.requests)
    storm_starts = 3.0  # seconds from now (see _storm)
    outage = [
        threading.Timer(storm_starts + 1.5, own_redis.kill),
        threading.Timer(storm_starts + 4.0, own_redis.start),
    ]
    for event in outage:
        event.start()
    logs: list[str] = []
    try:
        outcomes = _storm(
            fake,
            [account.pk],
            processes=4,
            threads=8,
            calls=3,
            env_extra={"REDIS_URL": own_redis.url, "CELERY_BROKER_URL": ""},
            logs=logs,
        )
    finally:
        for event in outage:
            event.cancel()
            event.join()

    assert [o for o in outcomes if "error" in o] == []
    assert portal.limit_hits == 0
    for log in logs:  # every process paced on its own meanwhile
        assert "rate limiter: Redis unavailable" in log, log[-2000:]
        assert "pacing this process alone" in log
    times = sorted(r["time"] for r in portal.requests[first:] if r.get("method_name") == "profile")
    assert len(times) == 4 * 8 * 3
    steady = times[burst:]
    achieved = (len(steady) - 1) / (steady[-1] - steady[0])
    assert achieved <= 1.1 * rate, achieved  # never over; slower is allowed


@pytest.mark.django_db
def test_refresh_with_wrong_app_credentials_blocks_nobody(fake, portal, installed, settings):
    settings.B24_CLIENT_SECRET = "a-wrong-secret-set-by-mistake"
    portal.expire_access_tokens()
    with pytest.raises(BitrixAuthError):
        services.account_client(installed).call("profile")
    account = Account.objects.get(pk=installed.pk)
    assert account.state == Account.State.ACTIVE
    assert "B24_CLIENT_SECRET" in account.last_refresh_error
    assert Portal.objects.get().state == Portal.State.ACTIVE
    settings.B24_CLIENT_SECRET = fake.client_secret
    assert services.account_client(account).call("profile")["ID"] == "1"


# --- invalid_client can mean "not installed on this portal" (OAuth docs, §2.5) -----------------


@pytest.fixture
def other_portal_refreshed(client, fake):
    """A second portal whose token was refreshed moments ago: the app's credentials work."""
    other = fake.add_portal()
    other.add_user(name="Olga", admin=True)
    assert install(client, other).status_code == 200
    account = Account.objects.select_related("portal").get(portal__member_id=other.member_id)
    services.account_tokens_refresh(account_id=account.pk)
    return other


def _removed_without_its_event(portal) -> None:
    """The app is removed from the portal and the ONAPPUNINSTALL never reaches it."""
    portal._revoke_all_tokens()
    with portal.lock:
        portal.installed, portal.uninstalled = False, True


@pytest.mark.django_db
def test_refresh_invalid_client_where_the_app_was_removed_is_a_removal_not_wrong_credentials(
    fake, portal, installed, other_portal_refreshed
):
    fake.not_installed_error = "invalid_client"
    _removed_without_its_event(portal)
    Account.objects.filter(pk=installed.pk).update(expires_at=timezone.now())

    with pytest.raises(BitrixAuthError):
        services.account_client(Account.objects.get(pk=installed.pk)).call("profile")

    account = Account.objects.get(pk=installed.pk)
    stored = Portal.objects.get(member_id=portal.member_id)
    assert account.state == Account.State.BLOCKED
    assert "removed from this Bitrix24" in account.state_reason
    assert "B24_CLIENT" not in account.last_refresh_error  # not a credentials fault
    assert stored.state == Portal.State.BLOCKED and "removed" in stored.state_reason
    assert account.access_token_encrypted  # nothing was deleted
    # app.info confirmed it with the account's token, on the portal's OAuth server.
    assert [r["method_name"] for r in fake.requests[-2:]] == ["oauth.token", "app.info"]
    other = Portal.objects.get(member_id=other_portal_refreshed.member_id)
    assert other.state == Portal.State.ACTIVE


@pytest.mark.django_db
def test_refresh_invalid_client_removed_portal_comes_back_when_installed_again(
    client, fake, portal, installed, other_portal_refreshed
):
    fake.not_installed_error = "invalid_client"
    _removed_without_its_event(portal)
    with pytest.raises(BitrixAuthError):
        services.account_tokens_refresh(account_id=installed.pk)
    assert Portal.objects.get(member_id=portal.member_id).state == Portal.State.BLOCKED

    with portal.lock:
        portal.uninstalled = False
    assert install(client, portal).status_code == 200

    assert Portal.objects.get(member_id=portal.member_id).state == Portal.State.ACTIVE
    assert Account.objects.get(pk=installed.pk).state == Account.State.ACTIVE


@pytest.mark.django_db
def test_refresh_invalid_client_with_no_other_portal_working_is_a_credentials_fault(
    fake, portal, installed
):
    """No proof the credentials work anywhere: as before, the operator is told to check them,
    and nobody is blocked."""
    fake.not_installed_error = "invalid_client"
    _removed_without_its_event(portal)
    with pytest.raises(BitrixAuthError):
        services.account_tokens_refresh(account_id=installed.pk)
    account = Account.objects.get(pk=installed.pk)
    assert account.state == Account.State.ACTIVE
    assert "check B24_CLIENT_ID and B24_CLIENT_SECRET" in account.last_refresh_error
    assert Portal.objects.get(member_id=portal.member_id).state == Portal.State.ACTIVE


@pytest.mark.django_db
def test_refresh_invalid_client_where_app_info_vouches_for_the_install_blocks_nobody(
    fake, portal, installed, other_portal_refreshed
):
    fake.fail_token_next(error="invalid_client")
    with pytest.raises(BitrixAuthError):
        services.account_tokens_refresh(account_id=installed.pk)
    account = Account.objects.get(pk=installed.pk)
    assert account.state == Account.State.ACTIVE
    assert "installed there, says app.info" in account.last_refresh_error
    assert Portal.objects.get(member_id=portal.member_id).state == Portal.State.ACTIVE


@pytest.mark.django_db
def test_refresh_invalid_client_that_app_info_cannot_confirm_waits_for_the_user(
    fake, portal, installed, other_portal_refreshed
):
    """The access token expired too, so app.info cannot tell: the account waits for its user's
    next visit (their work is kept and retried), and the portal is not blocked."""
    portal.expire_access_tokens()
    fake.fail_token_next(error="invalid_client")
    with pytest.raises(services.AccountAwaitingSignIn):
        services.account_tokens_refresh(account_id=installed.pk)
    account = Account.objects.get(pk=installed.pk)
    assert account.state == Account.State.WAITING
    assert "may have been removed" in account.state_reason
    assert Portal.objects.get(member_id=portal.member_id).state == Portal.State.ACTIVE


# --- the token request: a POST body first, a GET query only when the body provably went unread -

TOKEN_PARAMS_CASES = [
    # fake.token_params, fake.missing_client_id_error, HTTP methods of a first and a second refresh
    pytest.param("both", "invalid_request", ["POST"], ["POST"], id="both"),
    pytest.param("body", "invalid_request", ["POST"], ["POST"], id="body"),
    pytest.param("query", "invalid_request", ["POST", "GET"], ["GET"], id="query"),
    pytest.param("get_only", "invalid_request", ["POST", "GET"], ["GET"], id="get_only-405"),
    pytest.param("query", "wrong_client", ["POST", "GET"], ["GET"], id="query-wrong_client"),
]


def _token_http_methods(fake, since: int = 0) -> list[str]:
    return [call["http_method"] for call in fake.token_calls[since:]]


@pytest.mark.django_db
@pytest.mark.parametrize(("params", "missing", "first", "second"), TOKEN_PARAMS_CASES)
def test_refresh_works_however_the_oauth_server_reads_the_request(
    fake, portal, installed, params, missing, first, second
):
    fake.token_params = params
    fake.missing_client_id_error = missing
    since = len(fake.token_calls)
    portal.expire_access_tokens()
    assert services.account_client(installed).call("profile")["ID"] == "1"
    assert _token_http_methods(fake, since) == first
    assert services.oauth_server().token_method(fake.server_endpoint) == first[-1].lower()

    portal.expire_access_tokens()
    account = Account.objects.select_related("portal").get(pk=installed.pk)
    assert services.account_client(account).call("profile")["ID"] == "1"
    assert _token_http_methods(fake, since) == first + second  # straight to the working way

    calls = fake.token_calls[since:]
    assert [call["ok"] for call in calls if call["grant_type"] == "refresh_token"] == [True, True]
    assert not [call for call in calls if call["error"] == "invalid_grant"]  # never spent twice
    account = Account.objects.get(pk=installed.pk)
    assert account.state == Account.State.ACTIVE
    assert account.token_version == installed.token_version + 2


@pytest.mark.django_db
@pytest.mark.parametrize(
    "fault", ["invalid_grant", "500", "502", "timeout", "drop", "lost_response"]
)
def test_refresh_is_not_sent_by_get_after_an_answer_that_proves_nothing(
    fake, portal, installed, short_read_timeout, fault
):
    """The fake reads only the query string here, so a GET would succeed: the app must not send
    one after an answer from which it cannot tell whether the refresh token was spent."""
    fake.token_params = "query"
    since = len(fake.token_calls)
    portal.expire_access_tokens()
    fake.fail_token_next(error=fault)
    with pytest.raises(BitrixError):
        services.account_client(installed).call("profile")
    assert _token_http_methods(fake, since) == ["POST"]
    assert services.oauth_server().token_method(fake.server_endpoint) is None
    if fault == "invalid_grant":
        assert Account.objects.get(pk=installed.pk).state == Account.State.BLOCKED
        return
    # The caller's retry finds the way: the body was not read (the fake did not spend the
    # token, even for lost_response, having found no parameter), so GET is sent.
    account = Account.objects.select_related("portal").get(pk=installed.pk)
    assert services.account_client(account).call("profile")["ID"] == "1"
    assert _token_http_methods(fake, since) == ["POST", "POST", "GET"]


class _Collect(logging.Handler):
    """The messages of the records it sees, rendered as they arrive (a masking filter further
    on rewrites the record objects themselves)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.django_db
def test_refresh_by_get_leaves_no_secret_in_log_records_or_errors(fake, portal, installed, caplog):
    """With DEBUG on for urllib3, its request line carries the GET's query, and requests'
    exceptions carry the URL. Records are masked at their loggers, before any handler: `early`
    sits on the `urllib3` logger, ahead of the root's stdout handler, whose masking filter
    rewrites records in place for the handlers after it (caplog's among them)."""
    early = _Collect()
    logging.getLogger("urllib3").addHandler(early)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    try:
        fake.token_params = "query"
        portal.expire_access_tokens()
        assert services.account_client(installed).call("profile")["ID"] == "1"
        assert _token_http_methods(fake) == ["POST", "GET"]
        # The OAuth server goes away: the next refresh (straight to GET) cannot connect.
        endpoint = fake.server_endpoint
        refresh_token = Account.objects.get(pk=installed.pk).refresh_token
        fake.stop()
        with pytest.raises(BitrixUnavailable) as caught:
            services.oauth_server().refresh(endpoint, refresh_token)
    finally:
        logging.getLogger("urllib3").removeHandler(early)

    request_lines = [text for text in early.messages if "GET /oauth/token/?" in text]
    assert len(request_lines) == 1  # urllib3 logged the GET's request line, query included...
    assert "client_secret=" in request_lines[0] and "refresh_token=" in request_lines[0]
    texts = [*early.messages, *(record.getMessage() for record in caplog.records)]
    texts.append("".join(traceback.format_exception(caught.value)))
    with fake.lock:
        secrets = {fake.client_secret, *fake.refresh_tokens, *fake.access_tokens}
    assert refresh_token in secrets
    assert not [text for text in texts for secret in secrets if secret in text]  # ...masked


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_refresh_lock_wait_outlasts_a_refresh_and_running_out_is_busy_not_a_crash(
    client, fake, portal, settings
):
    """A waiter for another caller's refresh waits longer than that refresh may take (two token
    requests within the transport's deadline); if the holder outlasts even that, the waiter is
    told Bitrix24 is busy (a retry), never an uncaught database error (a 500)."""
    assert install(client, portal).status_code == 200
    account = Account.objects.get(user_id=1)
    settings.B24_HTTP_DEADLINE = 0.5
    wait_s = services.refresh_lock_wait_s()
    assert wait_s > 2 * 0.5
    holding, release = threading.Event(), threading.Event()

    def hold_the_row() -> None:
        from django.db import connection as own
        from django.db import transaction

        try:
            with transaction.atomic():
                Account.objects.select_for_update().get(pk=account.pk)
                holding.set()
                release.wait(wait_s + 30)
        finally:
            own.close()

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert holding.wait(30)
        started = time.monotonic()
        with pytest.raises(BitrixUnavailable) as caught:
            services.account_tokens_refresh(account_id=account.pk)
        waited = time.monotonic() - started
    finally:
        release.set()
        holder.join(30)
    assert caught.value.code == "REFRESH_BUSY" and caught.value.retry_after
    assert waited >= wait_s - 0.5  # it waited the whole lock wait first
    assert _refresh_calls(fake) == []  # nothing was spent
    refreshed = services.account_tokens_refresh(account_id=account.pk)
    assert refreshed.token_version == account.token_version + 1
