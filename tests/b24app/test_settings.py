"""Start-up configuration: no insecure production default, clear errors naming the variable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOOD_KEY = "x8Q4zv8W7V1o3bZr2m9P0f3c5kQyH1nJtU6wE2sRdAg="
# What `secrets.token_urlsafe(50)` makes (67 characters): a secret key that starts.
GOOD_SECRET = "Jm3kQ9vX2pL7wR4tN8bC1yH6sF5dG0aZ-uE_oI3eKq7WxV2nM9rT4pB8cY1hS6jD5fL"


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
        ({"DJANGO_DEBUG": "false", "DJANGO_SECRET_KEY": GOOD_SECRET}, "B24_TOKEN_KEYS"),
        ({"DJANGO_SECRET_KEY": GOOD_SECRET}, "B24_TOKEN_KEYS"),  # DJANGO_DEBUG defaults to false
    ],
)
def test_settings_production_without_secret_fails_naming_the_variable(env, missing):
    result = _run_django(env, "check")
    assert result.returncode != 0
    assert f"{missing} is not set" in result.stderr


def test_settings_bad_token_key_is_a_loud_error():
    result = _run_django(
        {"DJANGO_SECRET_KEY": GOOD_SECRET, "B24_TOKEN_KEYS": f"{GOOD_KEY},not-a-key"}, "check"
    )
    assert result.returncode != 0
    assert "B24_TOKEN_KEYS: key number 2 is not a valid Fernet key" in result.stderr
    assert "not-a-key" not in result.stderr


def test_settings_production_without_a_broker_refuses_unless_inline_work_is_asked_for():
    production = {"DJANGO_DEBUG": "false", "DJANGO_SECRET_KEY": GOOD_SECRET}
    production["B24_TOKEN_KEYS"] = GOOD_KEY
    production["CELERY_BROKER_URL"] = ""  # CI's environment sets one
    refused = _run_django(production, "check")
    assert refused.returncode != 0
    assert "CELERY_BROKER_URL is not set" in refused.stderr
    assert "B24_INLINE_TASKS=true" in refused.stderr
    assert _run_django({**production, "B24_INLINE_TASKS": "true"}, "check").returncode == 0
    with_broker = {**production, "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}
    assert _run_django(with_broker, "check").returncode == 0


def test_settings_debug_runs_without_secrets():
    result = _run_django({"DJANGO_DEBUG": "true"}, "check")
    assert result.returncode == 0, result.stderr


def test_settings_check_deploy_is_clean_with_production_variables():
    result = _run_django(
        {
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "k3v!Q9z#pL2@xW7^mN4&bR8*cT1(yH6)jF5%gD0$sA-uE_oI+eZ"
            + GOOD_SECRET,
            "B24_TOKEN_KEYS": GOOD_KEY,
            "DJANGO_ALLOWED_HOSTS": "app.example.com",
            "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
        },
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


WEAK_SECRETS = {
    "the .env.example value": "change-me",
    "short": "Jm3kQ9vX2pL7wR4tN8bC1yH6sF5dG0aZ-uE_oI3eKq7WxV2nM",  # 49 characters
    "few characters": "abab" * 20,
    "one character": "s" * 60,
    "a placeholder repeated": "change-me" * 8,
    "a word repeated": "secret" * 12,
    "a short random piece repeated": "Jm3kQ9vX2pL7wR4t" * 4,
    "a placeholder in brackets": "<put a long random secret key here, at least 50 characters>",
    "change me, padded": "please-change-me-0123456789-abcdefghijklmnopqrstuvwxyz",
    "django-insecure-": "django-insecure-" + GOOD_SECRET,
}


def _production(**env) -> dict:
    return {"DJANGO_DEBUG": "false", "B24_TOKEN_KEYS": GOOD_KEY, "B24_INLINE_TASKS": "true", **env}


def _start(env: dict) -> subprocess.CompletedProcess:
    """Load the settings as every process does at start-up (`django.setup()`)."""
    return _run_python(env, "import django; django.setup(); print('started')")


def _run_python(env_overrides: dict, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "B24_"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "b24app.settings",
            "DJANGO_ENV_FILE": str(ROOT / "tests" / "no-such.env"),
            **env_overrides,
        }
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("secret", WEAK_SECRETS.values(), ids=WEAK_SECRETS.keys())
def test_settings_refuse_a_weak_secret_key_with_debug_off(secret):
    result = _start(_production(DJANGO_SECRET_KEY=secret))
    assert result.returncode != 0
    assert "ImproperlyConfigured: DJANGO_SECRET_KEY is too weak" in result.stderr
    assert secret not in result.stderr  # the message never shows the value


@pytest.mark.parametrize("secret", WEAK_SECRETS.values(), ids=WEAK_SECRETS.keys())
def test_settings_refuse_a_weak_frame_signing_key_with_debug_off(secret):
    result = _start(_production(DJANGO_SECRET_KEY=GOOD_SECRET, B24_FRAME_SIGNING_KEY=secret))
    assert result.returncode != 0
    assert "ImproperlyConfigured: B24_FRAME_SIGNING_KEY is too weak" in result.stderr
    assert secret not in result.stderr


def test_settings_refuse_a_frame_signing_key_equal_to_the_secret_key():
    result = _start(_production(DJANGO_SECRET_KEY=GOOD_SECRET, B24_FRAME_SIGNING_KEY=GOOD_SECRET))
    assert result.returncode != 0
    assert "B24_FRAME_SIGNING_KEY must differ from DJANGO_SECRET_KEY" in result.stderr


def test_settings_a_strong_secret_key_starts_and_signs_frames_with_a_key_of_their_own():
    code = (
        "import django; django.setup(); from django.conf import settings; "
        "print(settings.B24_FRAME_SIGNING_KEY != settings.SECRET_KEY, "
        "len(settings.B24_FRAME_SIGNING_KEY) >= 50)"
    )
    result = _run_python(_production(DJANGO_SECRET_KEY=GOOD_SECRET), code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True True"
    own = "Zx8Wq2Lp5Nv9Rt3Yk7Hb1Mc6Df4Gs0Aj-Ue_Oi8Ek2Qw6Xr9Tn3Pb7Cy5Hl1Sm4Jd0Fv"
    result = _start(_production(DJANGO_SECRET_KEY=GOOD_SECRET, B24_FRAME_SIGNING_KEY=own))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "started"


def test_settings_celery_runs_inline_without_a_broker(settings):
    # The embedded default of the test run is decided by CELERY_BROKER_URL.
    assert settings.CELERY_TASK_ALWAYS_EAGER is (not settings.CELERY_BROKER_URL)
    assert settings.CELERY_TASK_SERIALIZER == "json"
    assert settings.CELERY_TASK_ACKS_LATE is True
    assert settings.CELERY_WORKER_PREFETCH_MULTIPLIER == 1


@pytest.mark.parametrize("debug", ["true", "false"])
def test_settings_static_files_come_from_the_apps_folders_only_while_debugging(debug):
    """In production the collected files and their manifest are the truth: a file missing
    from them is an error at once, not a page that quietly lacks its script."""
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.WHITENOISE_USE_FINDERS, s.WHITENOISE_MANIFEST_STRICT)"
    )
    result = _run_python(_production(DJANGO_SECRET_KEY=GOOD_SECRET, DJANGO_DEBUG=debug), code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == (["True", "False"] if debug == "true" else ["False", "True"])
