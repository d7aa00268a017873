"""Ids that come from outside: Bitrix24's answers (`profile.ID`, `app.info`'s `user_id`), form
fields and query parameters, operators' search terms.

`str.isdigit()` is not a test for "an id": it is true for "²" (which `int()` refuses, so the
request would end in a 500) and for other scripts' digits such as "١٢" (which `int()` reads as 12,
so two spellings would name one user). An id is 1 to 18 ASCII digits, nothing else: that also
fits every 64-bit integer column.
"""

from __future__ import annotations

import re

MAX_ID_DIGITS = 18
_ID = re.compile(rf"[0-9]{{1,{MAX_ID_DIGITS}}}")


def parse_id(value: object) -> int | None:
    """The number `value` names when it is 1 to 18 ASCII digits (or such a non-negative int),
    else `None`. No sign, space, underscore or other script's digit is accepted."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 10**MAX_ID_DIGITS else None
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        return None
    return int(value)
