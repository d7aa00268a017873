"""The summary of a whole ``python -m bench`` run: one table, and docs/PERFORMANCE.md.

Not a bench itself (no ``BENCH_ORDER``). ``python -m bench`` collects what each bench printed and
the headline figures each one ``record``-ed, then calls ``summary_table`` and ``write_document``.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from bench.common import ROOT

DOCUMENT = ROOT / "docs" / "PERFORMANCE.md"
PACKAGES = (
    "Django",
    "celery",
    "redis",
    "psycopg",
    "requests",
    "gunicorn",
    "b24pysdk",
    "fast-bitrix24",
    "locust",
)


def machine() -> list[tuple[str, str]]:
    """What the figures were measured on: CPU, memory, OS, interpreter, services, packages."""
    rows = [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("CPU", f"{_cpu_model()}, {os.cpu_count()} logical CPUs"),
        ("memory", _memory()),
        ("OS", _os_name()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("PostgreSQL", _command_version(["psql", "--version"])),
        ("Redis", _command_version(["redis-server", "--version"])),
    ]
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    rows.append(("packages", ", ".join(versions)))
    return rows


def summary_table(records: Sequence[dict[str, str]]) -> list[list[str]]:
    """Rows ``bench, figure, value, target`` of the recorded figures, in the order recorded."""
    return [[one["bench"], one["figure"], one["value"], one.get("target", "")] for one in records]


def write_document(
    records: Sequence[dict[str, str]],
    outputs: Sequence[tuple[str, str, str]],
    elapsed_s: float,
    path: Path = DOCUMENT,
) -> None:
    """docs/PERFORMANCE.md: how to reproduce, the machine, the summary, each bench's own table.

    ``outputs`` is ``(name, title, printed text)`` per bench in the order they ran.
    """
    lines = [
        "# Performance",
        "",
        "Written by `make bench` (`python -m bench`) on the machine below; do not edit by hand,",
        "run it again. Every figure comes from the benches in `bench/` against the fake Bitrix24",
        "portal of `tests/fakeportal/` on 127.0.0.1, so absolute times say as much about this",
        "machine and loopback HTTP as about the app: compare revisions on one machine.",
        "What each bench does and what each column means is in `bench/README.md`.",
        "",
        "## How to reproduce",
        "",
        "```sh",
        "make bench                        # every bench, then this file (needs PostgreSQL, Redis)",
        ".venv/bin/python -m bench client  # one bench, its table only",
        "```",
        "",
        "PostgreSQL on 127.0.0.1:5432 (user `postgres`) and Redis on 127.0.0.1:6379 are used where",
        "the behaviour measured depends on them; each bench uses databases of its own (see",
        "`bench/README.md`). Peers (`b24pysdk`, `fast-bitrix24`) and the load generator (`locust`)",
        "are the `bench` extra of `pyproject.toml`, which `make bench` installs.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in machine()),
        f"| whole run | {elapsed_s / 60:.1f} min |",
        "",
        "## Summary",
        "",
        "| bench | figure | value | target |",
        "|---|---|---|---|",
        *("| " + " | ".join(_cell(cell) for cell in row) + " |" for row in summary_table(records)),
        "",
        "## Each bench",
        "",
    ]
    for name, title, text in outputs:
        lines += [f"### `{name}`: {title}", "", "```", text.rstrip(), "```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))}, Linux {platform.release()}"
    except OSError:
        pass
    return platform.platform()


def _command_version(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return "not found"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "unknown"
