"""Code run in a fresh interpreter with Django set up, for what only start-up decides (settings
read from the environment, what gets imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def django_process(
    code: str,
    *,
    env: dict[str, str] | None = None,
    leave_out: Callable[[str], bool] = lambda name: False,
) -> subprocess.CompletedProcess:
    """Run `code` after `django.setup()` in a new interpreter, in the repository root, with this
    environment less the variables `leave_out` names, plus `env`; no `.env` file is read."""
    environment = {name: value for name, value in os.environ.items() if not leave_out(name)}
    environment.update(
        {
            "DJANGO_SETTINGS_MODULE": "b24app.settings",
            "DJANGO_ENV_FILE": str(ROOT / "tests" / "no-such.env"),
            **(env or {}),
        }
    )
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup()\n{code}"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
