"""Encryption of OAuth tokens at rest with `B24_TOKEN_KEYS` (MultiFernet).

The first key encrypts; every key decrypts, so keys rotate by putting a new key first, running
`manage.py b24 rotate-keys`, then dropping the old one. A value no key can decrypt is a loud
`TokenKeyError`, never a silent empty token.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver


class TokenKeyError(RuntimeError):
    """A stored token cannot be decrypted with any of B24_TOKEN_KEYS."""


@lru_cache(maxsize=1)
def _keys(raw_keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(key) for key in raw_keys])


def _current() -> MultiFernet:
    return _keys(tuple(settings.B24_TOKEN_KEYS))


@receiver(setting_changed)
def _forget_keys(*, setting, **kwargs):
    if setting == "B24_TOKEN_KEYS":
        _keys.cache_clear()


def encrypt(value: str) -> str:
    if not value:
        return ""
    return _current().encrypt(value.encode()).decode()


def decrypt(value: str) -> str:
    if not value:
        return ""
    try:
        return _current().decrypt(value.encode()).decode()
    except InvalidToken as exc:
        raise TokenKeyError(
            "A stored token cannot be decrypted with B24_TOKEN_KEYS: the key that encrypted it "
            "is missing (restore it as a later key and run `manage.py b24 rotate-keys`)."
        ) from exc


def reencrypt(value: str) -> str:
    """Re-encrypt `value` under the first key (no-op for empty values)."""
    if not value:
        return ""
    try:
        return _current().rotate(value.encode()).decode()
    except InvalidToken as exc:
        raise TokenKeyError("A stored token cannot be decrypted with B24_TOKEN_KEYS.") from exc


def fingerprint(secret: str) -> str:
    """A one-way SHA-256 of a high-entropy secret (the 128-bit `application_token`): enough to
    compare against in constant time, useless to anyone who reads the database."""
    return hashlib.sha256(secret.encode()).hexdigest()
