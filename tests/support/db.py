"""The test database, as processes a test starts need to find it."""

from __future__ import annotations


def test_database_url() -> str:
    """A DATABASE_URL naming the test database, for processes the test starts (PostgreSQL)."""
    from django.db import connection

    database = connection.settings_dict
    password = f":{database['PASSWORD']}" if database.get("PASSWORD") else ""
    return (
        f"postgres://{database['USER']}{password}@{database['HOST']}:{database['PORT']}"
        f"/{database['NAME']}"
    )


test_database_url.__test__ = False  # a helper, not a test
