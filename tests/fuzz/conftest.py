"""Hypothesis profiles of the fuzz suite, and where Hypothesis keeps its files.

Profiles (every one: no example database, no deadline, the blob to reproduce a failure printed):

- `b24app-fuzz-ci`, loaded when CI is set: 100 generated examples per test (about 1,100 in all,
  plus every pinned `@example`), the fuzz suite's share of CI's time budget. Every property is
  still checked on every endpoint; each CI run draws new examples, as none are stored.
- `b24app-fuzz-dev`, the default elsewhere: 200 per test.
- `b24app-fuzz-thorough`: 2,000 per test, for a long hunt (`HYPOTHESIS_PROFILE=...`).

`HYPOTHESIS_PROFILE=<name>` picks a profile; `FUZZ_EXAMPLES=<n>` overrides its count.

Hypothesis keeps nothing inside the repository: no example database, and its caches (unicode
tables, constants) go to a temporary directory, or to HYPOTHESIS_STORAGE_DIRECTORY when that is
set."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

from .profiles import PROFILE, fuzz_profile

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "b24app-hypothesis")


def pytest_report_header(config) -> str:
    return f"hypothesis (fuzz): profile {PROFILE}, {fuzz_profile().max_examples} examples per test"


def _cap_shrinking() -> None:
    """A failing example is shrunk for at most FUZZ_SHRINK_SECONDS (default 20) instead of
    Hypothesis's 300 s, so a CI run with a bug stays short. Hypothesis has no setting for this;
    the engine's module constant is the knob (harmless if a later version drops it)."""
    from hypothesis.internal.conjecture import engine

    engine.MAX_SHRINKING_SECONDS = int(os.environ.get("FUZZ_SHRINK_SECONDS") or 20)


_cap_shrinking()
