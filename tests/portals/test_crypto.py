import pytest
from cryptography.fernet import Fernet

from b24app.portals import crypto


def test_crypto_round_trip_does_not_store_clear_text():
    stored = crypto.encrypt("s6p6eclrvim6da22ft9ch94ekreb52lv")
    assert "s6p6eclrvim6da22ft9ch94ekreb52lv" not in stored
    assert crypto.decrypt(stored) == "s6p6eclrvim6da22ft9ch94ekreb52lv"


def test_crypto_wrong_key_is_a_loud_error(settings):
    stored = crypto.encrypt("secret-token-value")
    settings.B24_TOKEN_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(crypto.TokenKeyError):
        crypto.decrypt(stored)


def test_crypto_rotation_keeps_old_values_readable_and_reencrypts(settings):
    old_key = settings.B24_TOKEN_KEYS[0]
    stored = crypto.encrypt("secret-token-value")
    new_key = Fernet.generate_key().decode()
    settings.B24_TOKEN_KEYS = [new_key, old_key]
    assert crypto.decrypt(stored) == "secret-token-value"
    rotated = crypto.reencrypt(stored)
    settings.B24_TOKEN_KEYS = [new_key]
    assert crypto.decrypt(rotated) == "secret-token-value"
    with pytest.raises(crypto.TokenKeyError):
        crypto.decrypt(stored)


def test_crypto_fingerprint():
    assert (
        crypto.fingerprint("51856fefc120afa4b628cc82d3935cce") != "51856fefc120afa4b628cc82d3935cce"
    )
    assert len(crypto.fingerprint("x")) == 64
