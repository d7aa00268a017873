"""Fixtures of the security suite; the helpers behind them are in tests/support/security.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.security import Canary


@pytest.fixture
def canary() -> Iterator[Canary]:
    listener = Canary().start()
    try:
        yield listener
    finally:
        listener.stop()
