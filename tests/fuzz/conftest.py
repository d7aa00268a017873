"""Hypothesis keeps nothing inside the repository: no example database (every fuzz test sets
`database=None`), and its caches (unicode tables, constants) go to a temporary directory, or to
HYPOTHESIS_STORAGE_DIRECTORY when that is set."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "b24app-hypothesis")

settings.register_profile("b24app-fuzz", database=None, deadline=None, print_blob=True)


def _cap_shrinking() -> None:
    """A failing example is shrunk for at most FUZZ_SHRINK_SECONDS (default 20) instead of
    Hypothesis's 300 s, so a CI run with a bug stays short. Hypothesis has no setting for this;
    the engine's module constant is the knob (harmless if a later version drops it)."""
    from hypothesis.internal.conjecture import engine

    engine.MAX_SHRINKING_SECONDS = int(os.environ.get("FUZZ_SHRINK_SECONDS") or 20)


_cap_shrinking()
