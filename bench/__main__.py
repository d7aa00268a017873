"""``python -m bench [NAME ...]``: run the benches of this folder and print their tables.

Without names every bench runs, in ``BENCH_ORDER``; each runs in a process of its own, because
Django reads its settings once per process and the benches configure it differently. A bench is
a module here with ``BENCH_ORDER``, ``TITLE`` and ``main(argv) -> int``.

After the benches, one summary table of the figures they ``record``-ed is printed; a run of every
bench also writes docs/PERFORMANCE.md (``BENCH_WRITE_DOCS=0`` keeps the file as it is).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import RESULTS_ENV, print_table, read_records
from bench.report import DOCUMENT, summary_table, write_document

HERE = Path(__file__).resolve().parent
RUN_TIMEOUT_S = 15 * 60


def benches() -> dict[str, object]:
    """Bench modules of this folder by name, in their ``BENCH_ORDER``."""
    found = []
    for info in pkgutil.iter_modules([str(HERE)]):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if hasattr(module, "BENCH_ORDER") and callable(getattr(module, "main", None)):
            found.append((module.BENCH_ORDER, info.name, module))
    return {name: module for _, name, module in sorted(found)}


def main(argv: list[str]) -> int:
    available = benches()
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        for name, module in available.items():
            print(f"  {name:10} {module.TITLE}")
        return 0
    unknown = [name for name in argv if name not in available]
    if unknown:
        print(f"unknown bench {', '.join(unknown)}; known: {', '.join(available)}")
        return 2
    if len(argv) == 1:
        return available[argv[0]].main([])
    names = argv or list(available)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        results = Path(folder) / "records.jsonl"
        outputs, status = [], 0
        for name in names:
            text, code = _run_one(name, results)
            outputs.append((name, available[name].TITLE, text))
            if code != 0:
                print(f"bench {name}: failed (exit status {code})\n", flush=True)
                status = 1
        records = read_records(results)
    elapsed = time.monotonic() - started
    print_table(
        f"summary ({elapsed / 60:.1f} min)",
        ["bench", "figure", "value", "target"],
        summary_table(records),
    )
    if not argv and os.environ.get("BENCH_WRITE_DOCS", "1") != "0":
        write_document(records, outputs, elapsed)
        print(f"wrote {DOCUMENT.relative_to(HERE.parent)}")
    return status


def _run_one(name: str, results: Path) -> tuple[str, int]:
    """Run one bench in a process of its own; echo its output as it comes; return it, status."""
    env = {**os.environ, RESULTS_ENV: str(results), "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "bench", name],
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        watchdog = threading.Timer(RUN_TIMEOUT_S, process.kill)
        watchdog.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
            code = process.wait()
        finally:
            watchdog.cancel()
    if code < 0:
        lines.append(f"bench {name}: stopped by signal {-code} (limit {RUN_TIMEOUT_S} s)\n")
    return "".join(lines), code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
