"""WSGI entry point (gunicorn b24app.wsgi)."""

import os

from django.core.exceptions import SuspiciousOperation
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")

django_application = get_wsgi_application()

_BAD_REQUEST_HEADERS = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Content-Security-Policy", "frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
]


def application(environ, start_response):
    """Django's handler, answering 400 where Django itself would fail with a 500.

    Django builds the request object before any middleware runs, and with a `charset` in the
    Content-Type it parses the query string right there: too many fields then raise
    `TooManyFieldsSent` outside the handler that turns such errors into 400s (found by the fuzz
    suite). Nothing has been started at that point, so answering here is safe.
    """
    try:
        return django_application(environ, start_response)
    except SuspiciousOperation:
        start_response("400 Bad Request", _BAD_REQUEST_HEADERS)
        return [b"Bad request.\n"]
