"""The app's status reads as a word in the operator's portal pages ("Free", not "F"), and a letter
Bitrix24 sends that the app does not know is stored and shown as "Unknown (X)"."""

import re

import pytest

from b24app.portals.models import Portal
from tests.support.factories import PortalFactory
from tests.support.portals import post_event

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/portals/portal/"
WORDS = ("Free", "Demo", "Trial", "Paid", "Local", "Subscription")


def _cells(html: str) -> list[str]:
    """The app status column of the portal list, one cell per row."""
    return re.findall(r'<td class="field-app_status_shown">([^<]*)</td>', html)


def _filter_links(html: str) -> dict[str, str]:
    """The app status filter: link text -> its query string."""
    (block,) = re.findall(r"By app status\s*</summary>(.*?)</details>", html, re.S)
    return {
        text.strip(): query
        for query, text in re.findall(r'<a href="\?([^"]*)"[^>]*>([^<]+)</a>', block)
    }


def _readonly(html: str, label: str) -> str:
    (value,) = re.findall(rf">{label}:</label>\s*<div class=\"readonly\">([^<]*)</div>", html)
    return value


def test_the_portal_list_shows_the_app_status_in_words(admin_client):
    PortalFactory(number=1, app_status="F")
    PortalFactory(number=2, app_status="T")
    PortalFactory(number=3, app_status="")

    html = admin_client.get(CHANGELIST).content.decode()

    assert sorted(_cells(html)) == sorted(["Free", "Trial", "-"])
    assert '<th scope="col" class="sortable column-app_status_shown">' in html


def test_the_app_status_filter_lists_the_words_and_filters(admin_client):
    PortalFactory(number=1, app_status="F", domain="free.bitrix24.com")
    PortalFactory(number=2, app_status="T", domain="trial.bitrix24.com")

    links = _filter_links(admin_client.get(CHANGELIST).content.decode())

    assert list(links) == ["All", *WORDS]
    trial = admin_client.get(f"{CHANGELIST}?{links['Trial']}").content.decode()
    assert "trial.bitrix24.com" in trial and "free.bitrix24.com" not in trial
    assert _cells(trial) == ["Trial"]


def test_the_portal_page_shows_the_app_status_in_words(admin_client):
    portal = PortalFactory(app_status="T")

    html = admin_client.get(f"{CHANGELIST}{portal.pk}/change/").content.decode()

    assert _readonly(html, "App status") == "Trial"


def test_an_unknown_letter_is_shown_as_unknown_without_an_error(admin_client):
    portal = PortalFactory(number=1, app_status="X", domain="odd.bitrix24.com")
    PortalFactory(number=2, app_status="P")

    listing = admin_client.get(CHANGELIST)
    assert listing.status_code == 200
    html = listing.content.decode()
    assert sorted(_cells(html)) == ["Paid", "Unknown (X)"]
    links = _filter_links(html)
    assert list(links) == ["All", *WORDS, "Unknown (X)"]
    only = admin_client.get(f"{CHANGELIST}?{links['Unknown (X)']}").content.decode()
    assert _cells(only) == ["Unknown (X)"] and "odd.bitrix24.com" in only

    page = admin_client.get(f"{CHANGELIST}{portal.pk}/change/")
    assert page.status_code == 200
    assert _readonly(page.content.decode(), "App status") == "Unknown (X)"


def test_the_words_are_russian_for_a_russian_operator(admin_client):
    PortalFactory(number=1, app_status="S")
    PortalFactory(number=2, app_status="X")

    html = admin_client.get(CHANGELIST, HTTP_ACCEPT_LANGUAGE="ru").content.decode()

    assert sorted(_cells(html)) == ["Неизвестный статус (X)", "Подписка"]


def test_a_letter_bitrix24_sends_that_the_app_does_not_know_is_stored(client, admin_client, portal):
    portal.status = "X"  # what the portal's tokens and app.info report

    response = post_event(client, portal.event_body("ONAPPINSTALL", user_id=1))

    assert response.status_code == 200
    stored = Portal.objects.get(member_id=portal.member_id)
    assert (stored.state, stored.app_status) == (Portal.State.ACTIVE, "X")
    assert _cells(admin_client.get(CHANGELIST).content.decode()) == ["Unknown (X)"]
