"""The languages the app speaks (`settings.LANGUAGES`) and the one a Bitrix24 request asks for."""

from __future__ import annotations

from django.conf import settings

DEFAULT = "en"


def frame_language(code: object) -> str:
    """The language of Bitrix24's `LANG` (e.g. "ru", "de", "ua") if the app speaks it, else
    English. Bitrix24 sends it in the query of every page it opens in its frame."""
    code = str(code or "").strip().lower()[:2]
    return code if code in {language for language, _ in settings.LANGUAGES} else DEFAULT
