"""Parsing what Bitrix24 posts: PHP-style bracket keys (`auth[member_id]=…`) into dicts."""

from __future__ import annotations

import re

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
MAX_DEPTH = 4


def bracket_decode(pairs) -> dict:
    """`[("auth[member_id]", "x"), ("event", "Y")]` -> `{"auth": {"member_id": "x"}, "event": "Y"}`.

    Later values win; keys deeper than `MAX_DEPTH` and clashes between a value and a group
    are dropped rather than raising, since the input is untrusted.
    """
    result: dict = {}
    for raw_key, value in pairs:
        head, _, rest = raw_key.partition("[")
        path = [head] + (_BRACKETS.findall("[" + rest) if rest else [])
        if not head or len(path) > MAX_DEPTH:
            continue
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            if not isinstance(node.get(path[-1]), dict):
                node[path[-1]] = value
    return result
