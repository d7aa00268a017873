"""`GET /metrics`: off without B24_METRICS_TOKEN, refuses a missing or wrong token, never framed,
labels from fixed sets only, and summed across processes with PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.test import Client

from b24app import metrics
from tests.support.metrics import TOKEN, Scrape, moved, scrape

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_metrics_with_the_token_answers_prometheus_text_unframed(client, settings):
    settings.B24_METRICS_TOKEN = TOKEN
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert response["Cache-Control"] == "no-store"
    assert response["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
    found = Scrape(response.content.decode())
    assert found.has("b24app_outbox_queued_changes")
    assert found.has("b24app_outbox_oldest_queued_age_seconds")


def test_metrics_without_b24_metrics_token_is_off(client, settings):
    settings.B24_METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 404
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 404


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-token-of-the-same-kind-0000",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
    ],
)
def test_metrics_without_the_right_bearer_token_is_refused(client, settings, authorization):
    settings.B24_METRICS_TOKEN = TOKEN
    extra = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
    response = client.get("/metrics", **extra)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"b24app_" not in response.content
    assert TOKEN.encode() not in response.content


def test_metrics_refuses_other_methods_without_a_csrf_page(settings):
    settings.B24_METRICS_TOKEN = TOKEN
    client = Client(enforce_csrf_checks=True)
    response = client.post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 405


@pytest.mark.parametrize("token", ["q7w3z9k", "fifteen-chars-x"])
def test_settings_metrics_token_shorter_than_16_characters_stops_start_up(token):
    env = {k: v for k, v in os.environ.items() if not k.startswith("B24_METRICS")}
    env.update(
        {
            "B24_METRICS_TOKEN": token,
            "DJANGO_ENV_FILE": str(ROOT / "tests" / "no-such.env"),
            "DJANGO_SETTINGS_MODULE": "b24app.settings",
        }
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "check"],
        cwd=ROOT / "tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "B24_METRICS_TOKEN is too short: it must be at least 16 characters" in result.stderr
    assert token not in result.stderr.replace("B24_METRICS_TOKEN", "")


@pytest.mark.django_db
def test_metrics_labels_outside_the_fixed_sets_become_other(client, settings):
    """Whatever a portal answers or sends, the hooks label it from their own sets."""
    before = scrape(client, settings)
    metrics.frame_refused("made-up-reason", "HOSTILE_CODE_42")
    metrics.event_refused("made-up-kind", "portal.example.com")
    metrics.rest_call("crm.deal.list", "v9", 0.01, None)
    metrics.query_limit_exceeded("user.get")
    metrics.delivery_ended("something-else")
    after = scrape(client, settings)

    assert moved(before, after, "b24app_frame_opens_refused_total", reason="other", code="other")
    assert moved(before, after, "b24app_events_refused_total", kind="other", reason="other") == 1
    assert (
        moved(
            before,
            after,
            "b24app_rest_call_duration_seconds_count",
            method="other",
            api="other",
            outcome="ok",
        )
        == 1
    )
    assert moved(before, after, "b24app_query_limit_exceeded_total", method="other") == 1
    assert moved(before, after, "b24app_deliveries_total", outcome="other") == 1
    for made_up in ("made-up", "HOSTILE", "portal.example.com", "crm.deal", "v9", "user.get"):
        assert made_up not in after.text


def test_metrics_label_sets_follow_the_codes_they_name():
    """The fixed label sets are copies (the metrics module cannot import the services it counts
    for without a cycle): a refusal reason or an event's refusal kind added there must be
    added here too, or it would be counted as `other`."""
    from b24app.portals.services import EventKind, FrameRefusal

    assert {reason.value for reason in FrameRefusal} == metrics.FRAME_REASONS
    refusals = {EventKind.MALFORMED, EventKind.REFUSED, EventKind.UNAVAILABLE}
    assert refusals == metrics.EVENT_KINDS


def test_metrics_child_exit_hook_marks_the_gunicorn_worker_dead(tmp_path, monkeypatch):
    """gunicorn.conf.py's `child_exit` drops the exited worker's live-gauge files."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    dead, alive = tmp_path / "gauge_livesum_4242.db", tmp_path / "gauge_livesum_4343.db"
    counter = tmp_path / "counter_4242.db"
    for path in (dead, alive, counter):
        path.write_bytes(b"")
    hooks = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    hooks["child_exit"](None, SimpleNamespace(pid=4242))
    assert not dead.exists()
    assert alive.exists() and counter.exists()  # another worker's; the dead one's counts stay


MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import multiprocessing
    import sys


    def increment(times):
        from b24app import metrics

        for _ in range(times):
            metrics.delivery_ended("saved")
        metrics.token_refreshed(None)


    if __name__ == "__main__":
        processes = [
            multiprocessing.get_context("spawn").Process(target=increment, args=(times,))
            for times in (2, 3)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
            assert process.exitcode == 0, process.exitcode

        import django

        django.setup()
        from django.core.management import call_command
        from django.test import RequestFactory

        call_command("migrate", verbosity=0)
        from b24app.metrics import metrics_view

        request = RequestFactory().get("/metrics", HTTP_AUTHORIZATION="Bearer " + sys.argv[1])
        response = metrics_view(request)
        assert response.status_code == 200, response.status_code
        sys.stdout.write(response.content.decode())
    """
)


def test_metrics_multiprocess_mode_sums_every_process_and_reads_the_outbox_once(tmp_path):
    """Two processes count deliveries into PROMETHEUS_MULTIPROC_DIR; a third one's `/metrics`
    view reports their sum, and the outbox's gauges once, not once per process."""
    script = tmp_path / "processes.py"
    script.write_text(MULTIPROCESS_SCRIPT)
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
        "B24_METRICS_TOKEN": TOKEN,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "DJANGO_ENV_FILE": str(ROOT / "tests" / "no-such.env"),
        "DJANGO_SETTINGS_MODULE": "b24app.settings",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, str(script), TOKEN],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = Scrape(result.stdout)
    assert found.value("b24app_deliveries_total", outcome="saved") == 5
    assert found.value("b24app_token_refreshes_total", outcome="ok") == 2
    assert found.value("b24app_outbox_queued_changes") == 0
    assert result.stdout.count("\nb24app_outbox_queued_changes ") == 1
    assert any(path.name.startswith("counter_") for path in shared.iterdir())
