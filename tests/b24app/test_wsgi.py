"""The WSGI entry point turns request errors Django raises before its handler into 400s."""

import io
from urllib.parse import urlencode

import pytest

from b24app.wsgi import application


def _call(query: str, content_type: str, body: bytes = b"") -> tuple[str, dict, bytes]:
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/b24/install/",
        "QUERY_STRING": query,
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(body)),
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "HTTP_HOST": "localhost",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
    }
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, dict(headers)

    body_out = b"".join(application(environ, start_response))
    return answer["status"], answer["headers"], body_out


@pytest.mark.django_db
def test_wsgi_too_many_query_fields_with_a_charset_is_a_400_not_a_500():
    query = urlencode([(f"field{i}", "1") for i in range(1001)])
    status, headers, _ = _call(query, "application/x-www-form-urlencoded; charset=utf-8")
    assert status.startswith("400")
    assert headers["Content-Security-Policy"] == "frame-ancestors 'none'"


@pytest.mark.django_db
def test_wsgi_ordinary_requests_go_to_django():
    status, headers, body = _call("DOMAIN=x.bitrix24.com", "application/x-www-form-urlencoded")
    assert status.startswith(("400", "403", "503"))  # the install wizard's own refusal
    assert b"could not be installed" in body
