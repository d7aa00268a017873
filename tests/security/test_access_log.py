"""gunicorn's access log, which the app's masking filter never sees: the Procfile's web process
and the tests' app server both take it from `gunicorn.conf.py`, and it carries no query string."""

import os
from pathlib import Path

import requests

from tests.appserver import ROOT, AppServer


def test_the_procfile_serves_with_gunicorn_conf():
    web = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line[:4] == "web:")
    assert web.split(":", 1)[1].split() == ["gunicorn", "-c", "gunicorn.conf.py"]


def test_the_access_log_leaves_the_oauth_code_out(tmp_path: Path):
    web = AppServer(tmp_path / "web.log", workers=1, threads=2, access_log="-", new_session=True)
    web.start({**os.environ, "B24_APP_URL": web.url})
    try:
        web.wait_ready(60)
        answer = requests.get(
            f"{web.url}/b24/oauth/callback/?code=c0de5ecret0c0de5ecret&state=s",
            allow_redirects=False,
            timeout=30,
        )
    finally:
        web.stop()
    log = (tmp_path / "web.log").read_text()
    assert answer.status_code == 302  # to the admin login: the line was written
    assert '"GET /b24/oauth/callback/ HTTP/1.1" 302' in log
    assert "c0de5ecret" not in log
