"""The app's own public address, as the views that hand it to Bitrix24 (handler URLs) see it."""

from __future__ import annotations

from django.conf import settings

__all__ = ["app_url"]


def app_url(request) -> str:
    """The app's public base URL (`B24_APP_URL`, else the one the request came to), without a
    trailing slash."""
    return settings.B24_APP_URL or request.build_absolute_uri("/").rstrip("/")
