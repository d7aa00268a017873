"""The same AUTH_ID again within its lifetime: who it belongs to (`profile`'s answer) is reused,
keyed by an HMAC of the token and the portal, never the token itself; the portal and its
APPLICATION_TOKEN are still checked on every POST."""

import pytest
from django.conf import settings
from django.core.cache import cache

from b24app.portals.services import verification
from tests.support.portals import install, post_frame

pytestmark = pytest.mark.django_db


@pytest.fixture
def opened(client, portal):
    install(client, portal, 1)
    url, fields = portal.frame_post(1, options={"taskId": "0"})
    assert post_frame(client, url, fields).status_code == 200
    return url, fields


def _profiles(portal) -> int:
    return len(portal.calls("profile"))


def test_the_same_auth_id_again_asks_no_profile(client, portal, opened):
    url, fields = opened
    before = _profiles(portal)
    response = post_frame(client, url, fields)
    assert response.status_code == 200
    assert _profiles(portal) == before
    assert b"data-frame-token=" in response.content


def test_another_auth_id_asks_profile(client, portal, opened):
    before = _profiles(portal)
    url, fields = portal.frame_post(1, options={"taskId": "0"})
    assert post_frame(client, url, fields).status_code == 200
    assert _profiles(portal) == before + 1


def test_a_lifetime_that_ended_asks_profile_again(client, portal, opened, monkeypatch):
    url, fields = opened
    before = _profiles(portal)
    later = verification._clock() + int(fields["AUTH_EXPIRES"]) + 1
    monkeypatch.setattr(verification, "_clock", lambda: later)
    assert post_frame(client, url, fields).status_code == 200
    assert _profiles(portal) == before + 1


def test_a_short_lifetime_bounds_the_reuse(client, portal, monkeypatch):
    install(client, portal, 1)
    url, fields = portal.frame_post(1, options={"taskId": "0"})
    fields = {**fields, "AUTH_EXPIRES": "5"}
    assert post_frame(client, url, fields).status_code == 200
    before = _profiles(portal)
    later = verification._clock() + 6
    monkeypatch.setattr(verification, "_clock", lambda: later)
    assert post_frame(client, url, fields).status_code == 200
    assert _profiles(portal) == before + 1


def test_another_portal_with_the_same_token_does_not_reuse(portal):
    profile = verification.Profile(id=1, name="Anna", admin=True)
    verification.identity_remember(portal.member_id, "same-token", profile, "3600")
    assert verification.identity_recall(portal.member_id, "same-token") == profile
    assert verification.identity_recall("0" * 32, "same-token") is None
    assert verification.identity_key(portal.member_id, "same-token") != (
        verification.identity_key("0" * 32, "same-token")
    )


def test_the_portal_is_checked_again_with_a_known_auth_id(client, fake, portal, opened):
    # A posted APPLICATION_TOKEN that is not the stored one sends the check to app.info, known
    # AUTH_ID or not; one the OAuth server does not vouch for is refused.
    url, fields = opened
    app_infos = len([r for r in fake.requests if r["path"].endswith("app.info")])
    response = post_frame(client, url, {**fields, "APPLICATION_TOKEN": "f" * 32})
    assert response.status_code == 200
    assert len([r for r in fake.requests if r["path"].endswith("app.info")]) == app_infos + 1
    response = post_frame(
        client, url, {**fields, "APPLICATION_TOKEN": "f" * 32, "member_id": "0" * 32}
    )
    assert b"data-frame-token=" not in response.content


def _stored() -> dict[str, bytes]:
    """Every entry of the cache as stored: its full key and its raw (pickled) value, read from
    Redis itself when the cache is Redis (REDIS_URL), else from the local-memory cache."""
    if settings.REDIS_URL:
        import redis

        connection = redis.Redis.from_url(settings.REDIS_URL)
        try:
            return {
                key.decode(): connection.get(key)
                for key in connection.scan_iter(f"{settings.CACHES['default']['KEY_PREFIX']}:*")
            }
        finally:
            connection.close()
    return dict(cache._cache)  # LocMemCache: key -> pickled value


def test_the_cache_never_holds_the_token(client, portal, opened):
    _, fields = opened
    token = fields["AUTH_ID"]
    held = _stored()
    digest = verification.identity_key(portal.member_id, token).split(":", 1)[1]
    assert any(digest in key for key in held)
    for key, value in held.items():
        assert token not in key
        assert token.encode() not in value
        assert token not in repr(cache.get(key.split(":", 2)[2]))
        assert fields["REFRESH_ID"] not in key and fields["REFRESH_ID"].encode() not in value


def test_with_the_shared_redis_unreachable_the_cache_is_not_asked(portal, monkeypatch):
    """The limiter on the same Redis found it unreachable: the open asks `profile` instead of
    waiting out the cache's timeouts, and keeps nothing."""

    class Degraded:
        degraded = True

    asked: list[str] = []

    class Recording:  # errors would be swallowed as "cache down": record the calls instead
        def get(self, key, *args, **kwargs):
            asked.append("get")

        def set(self, key, *args, **kwargs):
            asked.append("set")

    monkeypatch.setattr(verification, "rate_limiter", lambda: Degraded())
    monkeypatch.setattr(verification, "cache", Recording())
    profile = verification.Profile(id=1, name="Anna", admin=True)
    verification.identity_remember(portal.member_id, "a-token", profile, "3600")
    assert verification.identity_recall(portal.member_id, "a-token") is None
    assert asked == []
