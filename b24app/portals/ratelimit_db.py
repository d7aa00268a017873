"""Gone: the rate limiter no longer stands in for Redis through the database (`ratelimit.py`
paces each process on its own, conservatively, while Redis is unreachable).

Only this name is left, for `b24app/portals/services.py`, which still passes it to
`limiter_from_url(fallback=...)` (ignored). Delete this file with that import.
"""


class DatabaseLeakyBucket:
    """Placeholder; does nothing (see the module doc)."""
