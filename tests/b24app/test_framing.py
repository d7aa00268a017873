"""Frame policy: frame views allow exactly the portal origin; everything else forbids framing."""

import pytest

FRAME_QUERY = (
    "?DOMAIN=portal.bitrix24.com&PROTOCOL=1&LANG=en&APP_SID=926d17365a87fbb35bace60dcc8f08cf"
)


@pytest.mark.django_db
def test_non_frame_pages_forbid_framing(client):
    for path in ("/healthz", "/admin/login/"):
        response = client.get(path)
        assert response["X-Frame-Options"] == "DENY", path
        assert response["Content-Security-Policy"] == "frame-ancestors 'none'", path


def test_frame_page_allows_exactly_the_portal_origin(client):
    response = client.post("/b24/app/" + FRAME_QUERY, {"PLACEMENT": "TASK_VIEW_TAB"})
    assert response.status_code == 200
    assert response["Content-Security-Policy"] == "frame-ancestors https://portal.bitrix24.com"
    assert "X-Frame-Options" not in response


def test_frame_page_with_a_bad_domain_is_not_framable(client):
    response = client.post("/b24/app/?DOMAIN=evil.com%20https://x&PROTOCOL=1", {})
    assert response["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert response["X-Frame-Options"] == "DENY"
