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


@pytest.mark.django_db
def test_frame_page_allows_exactly_the_portal_origin(client, portal):
    from tests.portals.support import install, post_frame

    install(client, portal)
    task_id = portal.add_task(title="Prepare the report")
    response = post_frame(client, *portal.frame_post(1, options={"taskId": str(task_id)}))
    assert response.status_code == 200
    policy = response["Content-Security-Policy"]
    assert policy.endswith(f"frame-ancestors {portal.url}")
    assert "*" not in policy
    assert "X-Frame-Options" not in response


@pytest.mark.django_db
def test_refused_frame_page_shows_only_in_the_named_portals_frame(client):
    response = client.post("/b24/app/" + FRAME_QUERY, {"PLACEMENT": "TASK_VIEW_TAB"})
    assert response.status_code == 400
    assert 'data-screen="refused"' in response.content.decode()
    assert response["Content-Security-Policy"].endswith(
        "frame-ancestors https://portal.bitrix24.com"
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "domain", ["evil.com%20https://x", "*", "a.com%3B%20script-src%20*", "", "%27self%27"]
)
def test_refused_frame_page_with_an_odd_domain_is_not_framable(client, domain):
    response = client.post(f"/b24/app/?DOMAIN={domain}&PROTOCOL=1", {})
    assert response.status_code == 400
    assert response["Content-Security-Policy"].endswith("frame-ancestors 'none'")
    assert response["X-Frame-Options"] == "DENY"


def test_error_pages_of_middleware_forbid_framing_too(client):
    response = client.post("/b24/install/", HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert response["X-Frame-Options"] == "DENY"
