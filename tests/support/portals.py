"""Helpers for driving the app the way Bitrix24 does, through Django's test client."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit


def post_frame(client, url: str, fields: dict):
    """POST a frame/installer request (query string + form body) to the app, form-encoded as
    Bitrix24's own form posts it into the frame."""
    parts = urlsplit(url)
    return client.post(
        f"{parts.path}?{parts.query}",
        data=urlencode(fields, doseq=True),
        content_type="application/x-www-form-urlencoded",
    )


def post_event(client, pairs):
    """POST an event body (PHP bracket keys, form-encoded) to the app."""
    return client.post(
        "/b24/events/", data=urlencode(pairs), content_type="application/x-www-form-urlencoded"
    )


def install(client, portal, user_id: int = 1):
    """Run the install wizard; when it succeeds, finish as the page's `installFinish` would."""
    url, fields = portal.install_post(user_id)
    response = post_frame(client, url, fields)
    if response.status_code == 200:
        portal.mark_installed()
    return response


def issued_tokens(fake, portal) -> list[str]:
    """Every access and refresh token the fake ever issued for `portal`."""
    with fake.lock:
        return [
            token.token
            for store in (fake.access_tokens, fake.refresh_tokens)
            for token in store.values()
            if token.member_id == portal.member_id
        ]


def kill_installer_tokens(portal) -> None:
    """The installer's refresh token dies at Bitrix24 and the app finds out on its next call:
    the installer's account and the portal end up blocked."""
    from b24app.portals import services
    from b24app.portals.bitrix import BitrixAuthError
    from b24app.portals.models import Account

    account = Account.objects.select_related("portal").get(
        portal__member_id=portal.member_id, is_installer=True
    )
    portal.expire_access_tokens()
    portal.revoke_refresh_tokens()
    try:
        services.account_client(account).call("profile")
    except BitrixAuthError:
        return
    raise AssertionError("the dead refresh token was not noticed")


def uninstall_body(portal, clean: int = 1):
    """What Bitrix24 does on uninstall: revoke the app's tokens first, then send the event."""
    portal.expire_access_tokens()
    portal.revoke_refresh_tokens()
    return portal.event_body("ONAPPUNINSTALL", user_id=None, data={"CLEAN": clean})
