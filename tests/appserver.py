"""The app served as the Procfile's ``web`` process serves it, for tests and benches.

gunicorn runs with the Procfile's ``gunicorn.conf.py`` (``b24app.wsgi``, ``gthread`` workers) on
a free port of 127.0.0.1, in a process
of its own, its output (its own log and the app's) going to a file. Callers choose the workers,
the threads, the environment and what else differs from production for them (an access log with
more fields, a shorter graceful timeout so that a run stops quickly).
"""

from __future__ import annotations

import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
PROCFILE_ACCESS_FORMAT = runpy.run_path(str(GUNICORN_CONF))["access_log_format"]
"""The access log line of the Procfile's ``web`` process."""
STOP_TIMEOUT_S = 20.0
"""How long gunicorn may take to stop (its workers finish their requests) before it is killed."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on at the moment."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class AppServer:
    """gunicorn serving the app on a free loopback port; its output goes to ``log_path``.

    The port is taken when the object is made, so that ``url`` can go into the environment
    (``B24_APP_URL``, the fake portal's ``app_url``) before ``start``. With ``new_session`` the
    server gets a process group of its own, and ``stop`` signals the whole group (master and
    workers), so that no worker outlives a test however it ends. ``workers`` and ``threads``
    default to the Procfile's; no access log unless ``access_log`` names one (``-``: the log).
    """

    def __init__(
        self,
        log_path: Path,
        *,
        workers: int = 2,
        threads: int = 8,
        access_log: Path | str | None = None,
        access_format: str | None = None,
        graceful_timeout_s: int | None = None,
        new_session: bool = False,
    ) -> None:
        self.log_path = Path(log_path)
        self.url = f"http://{LOOPBACK}:{free_port()}"
        self.new_session = new_session
        self.process: subprocess.Popen | None = None
        self.access_log = access_log
        self.command = [
            *(sys.executable, "-m", "gunicorn", "--config", str(GUNICORN_CONF)),
            *("--workers", str(workers), "--threads", str(threads)),
            *("--bind", self.url.removeprefix("http://")),
            *_no_control_socket(),
        ]
        if access_log is not None:
            self.command += ["--access-logfile", str(access_log)]
        if access_format is not None:
            self.command += ["--access-logformat", access_format]
        if graceful_timeout_s is not None:
            self.command += ["--graceful-timeout", str(graceful_timeout_s)]

    def start(self, env: Mapping[str, str] | None = None) -> AppServer:
        """Start gunicorn with ``env`` (this process's environment when ``None``)."""
        env = dict(os.environ if env is None else env)
        if self.access_log is None:
            env["GUNICORN_ACCESS_LOG"] = ""  # gunicorn.conf.py: no access log
        with open(self.log_path, "w", encoding="utf-8") as output:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Until ``/healthz`` answers at all (200, or 503 when a checked service is missing:
        either means the app is up); ``RuntimeError`` with the end of the log if it does not."""
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.process.returncode}):\n{self.tail()}")
            try:
                requests.get(f"{self.url}/healthz", timeout=5, allow_redirects=False)
            except requests.RequestException:
                time.sleep(0.2)
            else:
                return
        raise RuntimeError(f"gunicorn did not answer within {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        """The last whole lines of the log, about ``chars`` characters."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no output)"
        tail = text[-chars:]
        if len(text) > len(tail) and "\n" in tail:
            tail = tail[tail.index("\n") + 1 :]  # from the start of a line
        return tail

    def stop(self) -> None:
        """Stop gunicorn (its workers finish their requests first), killed if it takes longer
        than ``STOP_TIMEOUT_S``; nothing when it is not running."""
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def _signal(self, signum: int) -> None:
        if self.new_session:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)


def _no_control_socket() -> list[str]:
    """Recent gunicorn versions open a control socket at one path per OS user
    (``~/.gunicorn``); a server started here must not take it from another one on the machine."""
    from gunicorn.config import KNOWN_SETTINGS

    known = {setting.name for setting in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in known else []
