"""``python -m bench [NAME ...]``: run the benches of this folder and print their tables.

Without names every bench runs, in ``BENCH_ORDER``; each runs in a process of its own, because
Django reads its settings once per process and the benches configure it differently. A bench is
a module here with ``BENCH_ORDER``, ``TITLE`` and ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

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
    status = 0
    for name in argv or available:
        try:
            result = subprocess.run(
                [sys.executable, "-m", "bench", name], cwd=HERE.parent, timeout=RUN_TIMEOUT_S
            )
            code = result.returncode
        except subprocess.TimeoutExpired:
            print(f"bench {name}: stopped after {RUN_TIMEOUT_S} s")
            code = 1
        if code != 0:
            print(f"bench {name}: failed (exit status {code})\n", flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
