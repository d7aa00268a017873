"""Optional Sentry error reports (SENTRY_DSN): nothing without it; with it, no secret in any
event. The SDK runs with the options production uses (`b24app.errorreports.sentry_options`) and
a transport that records envelopes instead of sending them; each check reads the whole
serialized envelope."""

from __future__ import annotations

import io
import json
import logging
import subprocess
from wsgiref.util import setup_testing_defaults

import pytest
import sentry_sdk
from django.core.exceptions import ImproperlyConfigured
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from sentry_sdk.transport import Transport

from b24app import errorreports
from b24app import settings as settings_module
from b24app.celery import app as celery_app
from tests.b24app.test_logs import APP_TOKEN, CLIENT_SECRET, EVENT_ACCESS, FRAME_AUTH_ID, REFRESH
from tests.support.processes import django_process

DSN = "https://public@example.invalid/1"
# Values no pattern recognises: only leaving them out keeps them out of a report.
ODD_LOCAL = "Unusual-Shape-Local-Value-01"
BODY_MARKER = "Unusual-Shape-Body-Value-02"
FRAME_TOKEN = "frame.Unusual-Shape-Header-03"
SESSION = "Unusual-Shape-Session-Value-04"
BEARER = "Unusual-Shape-Bearer-Value-05"
# An application token is plain hex, like a member_id: it is masked by the key that names it.
SECRETS = (EVENT_ACCESS, REFRESH, CLIENT_SECRET, APP_TOKEN, FRAME_AUTH_ID)
UNMASKABLE = (ODD_LOCAL, BODY_MARKER, FRAME_TOKEN, SESSION, BEARER)


class RecordingTransport(Transport):
    """Keeps every envelope the SDK would send."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list = []

    def capture_envelope(self, envelope) -> None:
        self.envelopes.append(envelope)

    @property
    def events(self) -> list[dict]:
        return [e for e in (env.get_event() for env in self.envelopes) if e is not None]

    @property
    def transactions(self) -> list[dict]:
        found = (env.get_transaction_event() for env in self.envelopes)
        return [t for t in found if t is not None]

    def text(self) -> str:
        return "\n".join(env.serialize().decode("utf-8") for env in self.envelopes)


def _reset_sentry() -> None:
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)
    for scope in (sentry_sdk.get_isolation_scope(), sentry_sdk.get_current_scope()):
        scope.clear()


def _start(traces_sample_rate: float = 0.0) -> RecordingTransport:
    transport = RecordingTransport()
    options = errorreports.sentry_options(DSN, "test", traces_sample_rate)
    sentry_sdk.init(transport=transport, **options)
    return transport


@pytest.fixture
def reports(settings):
    """Sentry on, as production starts it, recording; off again (no client) afterwards."""
    settings.B24_CLIENT_SECRET = CLIENT_SECRET
    _reset_sentry()
    transport = _start()
    yield transport
    _reset_sentry()


@pytest.fixture
def traced_reports(settings):
    settings.B24_CLIENT_SECRET = CLIENT_SECRET
    _reset_sentry()
    transport = _start(traces_sample_rate=1.0)
    yield transport
    _reset_sentry()


def _assert_no_secret(text: str) -> None:
    for secret in SECRETS + UNMASKABLE:
        at = text.find(secret)
        # On failure: where it was, the secret cut to its first four characters.
        assert at < 0, f"{secret[:4]}… reached a report after: {text[max(0, at - 300) : at]}"


def _refresh_portal() -> None:
    access_token = EVENT_ACCESS  # locals, as a real failure would hold them
    refresh_token = REFRESH
    client_secret = CLIENT_SECRET
    application_token = APP_TOKEN
    odd_local = ODD_LOCAL
    assert odd_local
    raise ValueError(
        f"refresh failed access_token={access_token} refresh_token={refresh_token} "
        f"client_secret={client_secret} application_token={application_token}"
    )


def test_options_are_the_masked_ones():
    options = errorreports.sentry_options(DSN)
    assert options["dsn"] == DSN
    assert options["include_local_variables"] is False
    assert options["max_request_body_size"] == "never"
    assert options["traces_sample_rate"] == 0.0
    assert options["before_send"] is errorreports.mask_event
    assert options["before_send_transaction"] is errorreports.mask_event
    assert options["before_breadcrumb"] is errorreports.mask_breadcrumb
    assert "send_default_pii" not in options or options["send_default_pii"] is False


def test_started_client_sends_no_personal_data_and_reports_django_celery_and_logging(reports):
    client = sentry_sdk.get_client()
    assert client.is_active() and client.dsn == DSN
    assert client.should_send_default_pii() is False
    assert client.options["data_collection"]["user_info"] is False
    assert {"django", "celery", "logging"} <= set(client.integrations)


def test_exception_report_masks_its_message_and_sends_no_local_variables(reports):
    try:
        _refresh_portal()
    except ValueError:
        sentry_sdk.capture_exception()
    text = reports.text()
    _assert_no_secret(text)
    (event,) = reports.events
    (exception,) = event["exception"]["values"]
    assert exception["type"] == "ValueError"
    assert "access_token=s6p6*** refresh_token=4s38***" in exception["value"]
    assert "client_secret=*** application_token=5185***" in exception["value"]
    frames = exception["stacktrace"]["frames"]
    assert frames[-1]["function"] == "_refresh_portal"
    assert not any("vars" in frame for frame in frames)


def test_logged_error_report_masks_message_args_extra_traceback_and_breadcrumbs(reports):
    logger = logging.getLogger("tests.error_reports")
    # No masking filter on the way: the report alone must mask what Sentry takes from a record.
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    try:
        logger.warning("event auth[access_token]=%s seen", EVENT_ACCESS)  # a breadcrumb
        try:
            _refresh_portal()
        except ValueError:
            logger.error(
                "refresh failed for %s: %s, APPLICATION_TOKEN=%s",
                {"refresh_token": REFRESH},
                f"AUTH_ID={FRAME_AUTH_ID}",
                APP_TOKEN,
                exc_info=True,
                extra={"portal_note": f"client_secret={CLIENT_SECRET}", "refresh_token": REFRESH},
            )
    finally:
        logger.propagate = True
        logger.handlers.clear()
    text = reports.text()
    _assert_no_secret(text)
    (event,) = reports.events
    assert event["logger"] == "tests.error_reports"
    assert event["logentry"]["formatted"] == (
        f"refresh failed for {{'refresh_token': '4s38***'}}: AUTH_ID={FRAME_AUTH_ID[:4]}***, "
        "APPLICATION_TOKEN=5185***"
    )
    assert event["extra"]["portal_note"] == "client_secret=***"  # the configured secret: all
    assert event["extra"]["refresh_token"] == "4s38***"
    assert event["exception"]["values"][0]["type"] == "ValueError"
    crumbs = [c for c in event["breadcrumbs"]["values"] if c.get("category") == logger.name]
    # Masked when recorded and again when sent: a keyed value keeps none of its characters.
    assert crumbs[0]["message"] == "event auth[access_token]=*** seen"


@csrf_exempt
def _failing_view(request):
    auth_id = request.POST["AUTH_ID"]
    raise RuntimeError(
        f"placement failed AUTH_ID={auth_id} REFRESH_ID={request.POST['REFRESH_ID']}"
    )


urlpatterns = [path("boom/", _failing_view)]


@celery_app.task(name="tests.test_error_reports.failing_refresh_task")
def failing_refresh_task(portal_id: int, refresh_token: str) -> None:
    raise RuntimeError(f"refresh of portal {portal_id} failed refresh_token={refresh_token}")


def test_failing_celery_task_report_masks_the_exception_and_leaves_out_the_arguments(reports):
    with pytest.raises(RuntimeError):  # run here, as a worker runs it, whatever the broker
        failing_refresh_task.apply(args=(17, REFRESH), kwargs={}, throw=True)
    _assert_no_secret(reports.text())
    (event,) = reports.events
    assert event["transaction"] == "tests.test_error_reports.failing_refresh_task"
    assert event["exception"]["values"][-1]["value"] == (
        "refresh of portal 17 failed refresh_token=4s38***"
    )
    job = event["extra"]["celery-job"]
    assert job["args"] == job["kwargs"] == "[Filtered]"


def _post_through_wsgi(settings) -> str:
    """POST to a failing view through the app's WSGI entry point, as gunicorn does."""
    from b24app.wsgi import application

    settings.ROOT_URLCONF = __name__
    body = (
        f"AUTH_ID={FRAME_AUTH_ID}&REFRESH_ID={REFRESH}&APPLICATION_TOKEN={APP_TOKEN}"
        f"&PLACEMENT=TASK_VIEW_TAB&note={BODY_MARKER}"
    ).encode()
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(
        {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/boom/",
            "QUERY_STRING": f"DOMAIN=portal.example&AUTH_ID={FRAME_AUTH_ID}&code={EVENT_ACCESS}",
            "CONTENT_TYPE": "application/x-www-form-urlencoded",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
            "HTTP_HOST": "testserver",
            "SERVER_NAME": "testserver",
            "HTTP_X_FRAME_TOKEN": FRAME_TOKEN,
            "HTTP_COOKIE": f"sessionid={SESSION}",
            "HTTP_AUTHORIZATION": f"Bearer {BEARER}",
        }
    )
    statuses: list[str] = []
    chunks = application(environ, lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(chunks)
    getattr(chunks, "close", lambda: None)()
    return statuses[0]


def _assert_request_masked(request: dict) -> None:
    assert request["method"] == "POST"
    assert request["url"].endswith("/boom/")
    assert request["query_string"] == (
        f"DOMAIN=portal.example&AUTH_ID={FRAME_AUTH_ID[:4]}***&code={EVENT_ACCESS[:4]}***"
    )
    assert request["headers"]["X-Frame-Token"] == FRAME_TOKEN[:4] + "***"
    assert request["headers"]["Cookie"] == request["headers"]["Authorization"] == "[Filtered]"
    assert "cookies" not in request
    assert "PLACEMENT" not in json.dumps(request.get("data", ""))  # the body is never read


def test_request_report_masks_query_string_and_headers_and_never_sends_the_body(reports, settings):
    assert _post_through_wsgi(settings).startswith("500")
    text = reports.text()
    _assert_no_secret(text)
    assert reports.events
    event = next(e for e in reports.events if e.get("request"))
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    assert f"AUTH_ID={FRAME_AUTH_ID[:4]}*** REFRESH_ID=4s38***" in text
    _assert_request_masked(event["request"])


def test_traced_request_transaction_is_masked_too(traced_reports, settings):
    assert _post_through_wsgi(settings).startswith("500")
    _assert_no_secret(traced_reports.text())
    (transaction,) = traced_reports.transactions
    _assert_request_masked(transaction["request"])


def test_an_event_is_dropped_when_masking_fails(reports, monkeypatch):
    def broken(text):
        raise RuntimeError("masking broke")

    monkeypatch.setattr(errorreports, "mask_secrets", broken)
    try:
        _refresh_portal()
    except ValueError:
        sentry_sdk.capture_exception()
    assert reports.events == []
    _assert_no_secret(reports.text())


def test_mask_event_masks_every_string_and_field_and_keeps_the_release():
    release = "0123456789abcdef0123456789abcdef01234567"  # a commit id
    event = {
        "event_id": "5a1f0d3e9c8b4a7f8e6d5c4b3a291807",
        "release": release,
        "message": f"token expired for {FRAME_AUTH_ID}",
        "tags": {"portal": "portal.example", "auth": APP_TOKEN},
        "extra": {
            "celery-job": {"args": [f"refresh_token={REFRESH}"], "kwargs": {}},
            "error_code": "QUERY_LIMIT_EXCEEDED",
            "status_code": 503,
        },
        "contexts": {"note": {"client_secret": CLIENT_SECRET, "frame_token": FRAME_TOKEN}},
        "breadcrumbs": {"values": [{"data": {"http.query": f"client_secret={CLIENT_SECRET}"}}]},
        "request": {"headers": {"X-Frame-Token": FRAME_TOKEN}, "data": {"AUTH_ID": [APP_TOKEN]}},
        EVENT_ACCESS: "a token used as a key",
    }
    masked = errorreports.mask_event(event, {})
    text = json.dumps(masked)
    for secret in (*SECRETS, FRAME_TOKEN):
        assert secret not in text
    assert masked["release"] == release and masked["event_id"] == event["event_id"]
    assert masked["tags"] == {"portal": "portal.example", "auth": "5185***"}
    assert masked["request"]["data"] == {"AUTH_ID": ["5185***"]}
    assert masked["extra"]["celery-job"]["args"] == ["refresh_token=4s38***"]
    assert masked["extra"]["error_code"] == "QUERY_LIMIT_EXCEEDED"  # not a secret's name
    assert masked["extra"]["status_code"] == 503
    assert masked["contexts"]["note"]["frame_token"] == FRAME_TOKEN[:4] + "***"


def _start_django(env_overrides: dict[str, str], code: str) -> subprocess.CompletedProcess:
    return django_process(
        code, env=env_overrides, leave_out=lambda name: name.startswith("SENTRY_")
    )


def test_without_sentry_dsn_nothing_is_imported_or_initialised():
    result = _start_django(
        {},
        "import sys\nprint('sentry_sdk' in sys.modules, 'b24app.errorreports' in sys.modules)\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_with_sentry_dsn_the_settings_start_the_masked_client():
    result = _start_django(
        {
            "SENTRY_DSN": DSN,
            "SENTRY_ENVIRONMENT": "staging",
            "SENTRY_TRACES_SAMPLE_RATE": "0.25",
        },
        "import json, sentry_sdk\n"
        "from b24app import errorreports\n"
        "c = sentry_sdk.get_client()\n"
        "o = c.options\n"
        "print(json.dumps([c.is_active(), c.dsn, o['environment'], o['traces_sample_rate'],\n"
        "    o['include_local_variables'], o['max_request_body_size'],\n"
        "    o['before_send'] is errorreports.mask_event, c.should_send_default_pii(),\n"
        "    sorted(set(c.integrations) & {'django', 'celery', 'logging'})]))\n"
        "c.close()\n",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        True,
        DSN,
        "staging",
        0.25,
        False,
        "never",
        True,
        False,
        ["celery", "django", "logging"],
    ]


@pytest.mark.parametrize("value, rate", [("", 0.0), ("0", 0.0), ("0.1", 0.1), ("1", 1.0)])
def test_traces_sample_rate_defaults_to_zero_and_takes_a_fraction(monkeypatch, value, rate):
    monkeypatch.setenv("SENTRY_TRACES_SAMPLE_RATE", value)
    assert settings_module._sample_rate("SENTRY_TRACES_SAMPLE_RATE") == rate


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "half", "10%"])
def test_traces_sample_rate_out_of_range_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("SENTRY_TRACES_SAMPLE_RATE", value)
    with pytest.raises(ImproperlyConfigured, match="SENTRY_TRACES_SAMPLE_RATE must be a number"):
        settings_module._sample_rate("SENTRY_TRACES_SAMPLE_RATE")
