"""Hypothesis profiles of the fuzz suite (see conftest.py for which one a run uses)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "b24app-fuzz",
    database=None,
    deadline=None,
    print_blob=True,
    # One installed world per test (a function-scoped fixture) serves all its examples, each in
    # a savepoint that is rolled back; an example is an HTTP exchange, slow by Hypothesis's
    # measure.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_BASE = settings.get_profile("b24app-fuzz")
settings.register_profile("b24app-fuzz-ci", _BASE, max_examples=100)
settings.register_profile("b24app-fuzz-dev", _BASE, max_examples=200)
settings.register_profile("b24app-fuzz-thorough", _BASE, max_examples=2000)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or (
    "b24app-fuzz-ci" if os.environ.get("CI") else "b24app-fuzz-dev"
)


def fuzz_profile() -> settings:
    """The profile this run uses, with FUZZ_EXAMPLES's count when that is set."""
    profile = settings.get_profile(PROFILE)
    examples = os.environ.get("FUZZ_EXAMPLES")
    return settings(profile, max_examples=int(examples)) if examples else profile
