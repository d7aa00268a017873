"""The 500 page: readable in the Bitrix24 frame, in the frame's language, with nothing of what
failed. (tests/faults/test_database_restart.py shows it during a real database outage.)"""

import json

from django.test import RequestFactory

from b24app import urls
from b24app.errors import server_error
from b24app.framing import FramePolicyMiddleware

LEAKS = ("Traceback", "Error", "psycopg", "sqlite")


def _answer(path: str, **headers):
    request = RequestFactory().post(path, **headers)
    return FramePolicyMiddleware(server_error)(request)


def test_server_errors_are_answered_by_the_frameable_handler():
    assert urls.handler500 == "b24app.errors.server_error"


def test_server_error_in_a_portals_frame_may_be_shown_there_in_its_language():
    response = _answer("/b24/app/?DOMAIN=portal.bitrix24.ru&PROTOCOL=1&LANG=ru")
    page = response.content.decode()
    assert response.status_code == 500
    assert "Что-то пошло не так" in page and 'lang="ru"' in page
    assert response["Content-Security-Policy"] == "frame-ancestors https://portal.bitrix24.ru"
    assert "X-Frame-Options" not in response
    assert not [leak for leak in LEAKS if leak in page]


def test_server_error_elsewhere_forbids_framing():
    response = _answer("/admin/")
    assert response.status_code == 500
    assert "Something went wrong on our side" in response.content.decode()
    assert response["Content-Security-Policy"] == "frame-ancestors 'none'"


def test_server_error_for_the_open_screens_requests_is_json():
    response = _answer("/b24/app/results/add/?lang=ru", HTTP_ACCEPT="application/json")
    assert response.status_code == 500
    assert json.loads(response.content) == {
        "error": "server_error",
        "message": "Что-то пошло не так на нашей стороне. Попробуйте через минуту.",
    }
