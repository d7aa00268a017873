"""Small helpers shared by the emulator modules (stdlib only)."""

from __future__ import annotations

import json
import re
import secrets
import threading
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl

MISSING = object()


def new_hex(nbytes: int = 16) -> str:
    """Random lower-case hex string of ``2 * nbytes`` characters."""
    return secrets.token_hex(nbytes)


def new_token() -> str:
    # Real frame tokens look like 70 hex characters (see §3.2 examples); the
    # exact format is opaque to clients.
    return issued(secrets.token_hex(35))


_ISSUED: set[str] = set()
_ISSUED_LOCK = threading.Lock()


def issued(secret: str) -> str:
    """Remember ``secret`` as handed out by a fake in this process and return it.

    Every access and refresh token, ``application_token``, authorization code and webhook code
    goes through here, so a check can look for all of them wherever they must never appear
    (the security suite's whole-run log check, ``tests/security/logcheck.py``)."""
    with _ISSUED_LOCK:
        _ISSUED.add(secret)
    return secret


def issued_secrets() -> frozenset[str]:
    """Every secret any fake in this process has issued so far (see :func:`issued`)."""
    with _ISSUED_LOCK:
        return frozenset(_ISSUED)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def php_json(value) -> str:
    """JSON the way PHP's json_encode writes it by default: ASCII only and
    ``/`` escaped as ``\\/`` (e.g. ``{"URI":"\\/company\\/..."}``)."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/")


def iso(ts: float, tz: timezone) -> str:
    """``YYYY-MM-DDThh:mm:ss+hh:mm`` in the portal's time zone."""
    return datetime.fromtimestamp(int(ts), tz).isoformat(timespec="seconds")


def make_tz(offset_minutes: int) -> timezone:
    return timezone(timedelta(minutes=offset_minutes))


def php_flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    """Encode nested dicts/lists with PHP bracket keys, like http_build_query:
    ``{"auth": {"member_id": "x"}}`` -> ``[("auth[member_id]", "x")]``.
    ``None`` values are skipped, booleans become ``"1"``/``"0"``."""
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        if value is None:
            return pairs
        if isinstance(value, bool):
            return [(prefix, "1" if value else "0")]
        return [(prefix, str(value))]
    for key, sub in items:
        name = f"{prefix}[{key}]" if prefix else str(key)
        pairs.extend(php_flatten(sub, name))
    return pairs


_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_SUB_RE = re.compile(r"\[([^\[\]]*)\]")


def parse_php_pairs(pairs) -> dict:
    """Decode PHP bracket keys into nested dicts (``a[b][c]=1`` -> ``{"a": {"b": {"c": "1"}}}``).

    ``a[]=x`` appends with numeric string keys ("0", "1", ...) as PHP arrays do.
    Later values win, as in PHP."""
    root: dict = {}
    for key, value in pairs:
        m = _KEY_RE.match(key)
        if not m:
            root[key] = value
            continue
        path = [m.group(1), *_SUB_RE.findall(m.group(2))]
        cur = root
        for i, part in enumerate(path):
            if part == "":
                part = str(len(cur))
            if i == len(path) - 1:
                cur[part] = value
            else:
                nxt = cur.get(part)
                if not isinstance(nxt, dict):
                    nxt = {}
                    cur[part] = nxt
                cur = nxt
    return root


def parse_php_qs(qs: str) -> dict:
    return parse_php_pairs(parse_qsl(qs, keep_blank_values=True))


def as_list(value) -> list:
    """A JSON list, or a PHP-style dict with numeric keys, as a list."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    return [value]


def truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "y", "yes", "true", "on"}
    return bool(value)


def get_ci(params: dict, name: str, default=None):
    """Case-insensitive lookup of a classic REST parameter (Bitrix24 accepts
    ``PLACEMENT``/``placement`` alike for most methods)."""
    if name in params:
        return params[name]
    low = name.lower()
    for key, value in params.items():
        if isinstance(key, str) and key.lower() == low:
            return value
    return default


class Headers(dict):
    """A dict of request headers with case-insensitive lookups.

    Keys are stored as received; ``h["idempotency-key"]`` and
    ``h["Idempotency-Key"]`` both work."""

    def _find(self, key):
        if dict.__contains__(self, key):
            return key
        low = key.lower() if isinstance(key, str) else key
        for k in dict.keys(self):
            if isinstance(k, str) and k.lower() == low:
                return k
        return None

    def __getitem__(self, key):
        found = self._find(key)
        if found is None:
            raise KeyError(key)
        return dict.__getitem__(self, found)

    def __contains__(self, key):
        return self._find(key) is not None

    def get(self, key, default=None):
        found = self._find(key)
        return default if found is None else dict.__getitem__(self, found)
