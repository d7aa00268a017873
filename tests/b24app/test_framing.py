"""Frame policy: frame views allow exactly the portal origin; everything else forbids framing."""

import pytest

from tests.support.http import csp

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
    from tests.support.portals import install, post_frame

    install(client, portal)
    task_id = portal.add_task(title="Prepare the report")
    response = post_frame(client, *portal.frame_post(1, options={"taskId": str(task_id)}))
    assert response.status_code == 200
    # The screen's whole policy, written out here apart from the code's own (results/http.py).
    assert csp(response) == {
        "default-src": "'self'",
        "script-src": "'self'",
        "style-src": "'self'",
        "img-src": "'self' data:",
        "connect-src": "'self'",
        "form-action": "'self'",
        "base-uri": "'none'",
        "object-src": "'none'",
        "frame-ancestors": portal.url,
    }
    assert "X-Frame-Options" not in response


@pytest.mark.django_db
def test_refused_frame_page_shows_only_in_the_named_portals_frame(client):
    response = client.post("/b24/app/" + FRAME_QUERY, {"PLACEMENT": "TASK_VIEW_TAB"})
    assert response.status_code == 400
    assert 'data-screen="refused"' in response.content.decode()
    assert csp(response)["frame-ancestors"] == "https://portal.bitrix24.com"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "domain", ["evil.com%20https://x", "*", "a.com%3B%20script-src%20*", "", "%27self%27"]
)
def test_refused_frame_page_with_an_odd_domain_is_not_framable(client, domain):
    response = client.post(f"/b24/app/?DOMAIN={domain}&PROTOCOL=1", {})
    assert response.status_code == 400
    assert csp(response)["frame-ancestors"] == "'none'"
    assert response["X-Frame-Options"] == "DENY"


def test_error_pages_of_middleware_forbid_framing_too(client):
    response = client.post("/b24/install/", HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert response["X-Frame-Options"] == "DENY"


def _through_the_middleware(response, path="/b24/app/"):
    from django.test import RequestFactory

    from b24app.framing import FramePolicyMiddleware

    return FramePolicyMiddleware(lambda request: response)(RequestFactory().get(path))


def test_a_views_own_policy_keeps_its_directives_and_the_frame_rule():
    from django.http import HttpResponse

    from b24app.framing import allow_portal_framing, policy_replace

    own = {"default-src": ["'self'"], "object-src": ["'none'"]}
    plain = policy_replace(HttpResponse(), own)
    assert csp(_through_the_middleware(plain)) == {
        "default-src": "'self'",
        "object-src": "'none'",
        "frame-ancestors": "'none'",
    }
    framed = allow_portal_framing(
        policy_replace(HttpResponse(), own), "https://portal.bitrix24.com"
    )
    answered = _through_the_middleware(framed)
    assert csp(answered) == {
        "default-src": "'self'",
        "object-src": "'none'",
        "frame-ancestors": "https://portal.bitrix24.com",
    }
    # the order of the calls does not matter: the frame rule is kept either way
    framed_first = policy_replace(
        allow_portal_framing(HttpResponse(), "https://portal.bitrix24.com"), own
    )
    assert csp(_through_the_middleware(framed_first)) == csp(answered)


def test_debug_error_pages_forbid_framing_too(settings):
    """django-csp leaves the 404 and 500 pages alone while DEBUG is on; the frame rule holds."""
    from django.http import HttpResponseNotFound, HttpResponseServerError

    from b24app.framing import allow_portal_framing

    settings.DEBUG = True
    for response in (HttpResponseNotFound(), HttpResponseServerError()):
        assert _through_the_middleware(response)["Content-Security-Policy"] == (
            "frame-ancestors 'none'"
        )
    framed = allow_portal_framing(HttpResponseNotFound(), "https://portal.bitrix24.com")
    assert _through_the_middleware(framed)["Content-Security-Policy"] == (
        "frame-ancestors https://portal.bitrix24.com"
    )
