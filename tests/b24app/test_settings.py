"""Start-up configuration: no insecure production default, clear errors naming the variable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOOD_KEY = "x8Q4zv8W7V1o3bZr2m9P0f3c5kQyH1nJtU6wE2sRdAg="


def _run_django(env_overrides: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "B24_"))}
    # No .env (a developer's `make run` writes one): only the variables given here count.
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "b24app.settings",
            "DJANGO_ENV_FILE": str(ROOT / "tests" / "no-such.env"),
            **env_overrides,
        }
    )
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT / "tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "env, missing",
    [
        ({"DJANGO_DEBUG": "false", "B24_TOKEN_KEYS": GOOD_KEY}, "DJANGO_SECRET_KEY"),
        ({"DJANGO_DEBUG": "false", "DJANGO_SECRET_KEY": "s" * 60}, "B24_TOKEN_KEYS"),
        ({"DJANGO_SECRET_KEY": "s" * 60}, "B24_TOKEN_KEYS"),  # DJANGO_DEBUG defaults to false
    ],
)
def test_settings_production_without_secret_fails_naming_the_variable(env, missing):
    result = _run_django(env, "check")
    assert result.returncode != 0
    assert f"{missing} is not set" in result.stderr


def test_settings_bad_token_key_is_a_loud_error():
    result = _run_django(
        {"DJANGO_SECRET_KEY": "s" * 60, "B24_TOKEN_KEYS": f"{GOOD_KEY},not-a-key"}, "check"
    )
    assert result.returncode != 0
    assert "B24_TOKEN_KEYS: key number 2 is not a valid Fernet key" in result.stderr
    assert "not-a-key" not in result.stderr


def test_settings_debug_runs_without_secrets():
    result = _run_django({"DJANGO_DEBUG": "true"}, "check")
    assert result.returncode == 0, result.stderr


def test_settings_check_deploy_is_clean_with_production_variables():
    result = _run_django(
        {
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "k3v!Q9z#pL2@xW7^mN4&bR8*cT1(yH6)jF5%gD0$sA-uE_oI+eZ" * 2,
            "B24_TOKEN_KEYS": GOOD_KEY,
            "DJANGO_ALLOWED_HOSTS": "app.example.com",
        },
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_settings_celery_runs_inline_without_a_broker(settings):
    # The embedded default of the test run is decided by CELERY_BROKER_URL.
    assert settings.CELERY_TASK_ALWAYS_EAGER is (not settings.CELERY_BROKER_URL)
    assert settings.CELERY_TASK_SERIALIZER == "json"
    assert settings.CELERY_TASK_ACKS_LATE is True
    assert settings.CELERY_WORKER_PREFETCH_MULTIPLIER == 1
