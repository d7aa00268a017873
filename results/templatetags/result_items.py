"""``{% result_item item %}``: one result of the list, as ``{% include "results/_item.html" %}``
renders it, from a per-process cache of rendered items.

A task's results are the same from one open to the next (and from one person to the next, but
for their rights), so the list does not run ``_item.html``'s nodes for each of them on every
open. An item without a change is rendered with ``item`` alone (all the template reads of it)
and kept under everything it shows: the template itself, the active language, and the item's
fields. An item with a change (its state, a retry form with the frame token) is rendered in the
whole context every time, as the include did. tests/results/test_item_cache.py holds the two
renderings to the same bytes.
"""

from __future__ import annotations

from django import template
from django.core.signals import setting_changed
from django.utils import translation

register = template.Library()

ITEM_TEMPLATE = "results/_item.html"
CACHED_ITEMS = 2048
"""Rendered items kept per process; all are dropped when it is full."""
CACHED_TEXT = 2000
"""A result with a longer text is rendered every time: with its key and its HTML (which holds the
text twice) the cache stays within about 15 MB per process whatever the texts."""

_rendered: dict[tuple, str] = {}


def _key(compiled, item) -> tuple:
    return (
        id(compiled),
        translation.get_language(),
        item.id,
        item.text,
        item.author_name,
        item.created_iso,
        item.updated_iso,
        item.closed,
        item.can_edit,
        item.can_remove,
        item.pending_delete,
    )


@register.simple_tag(takes_context=True)
def result_item(context, item):
    compiled = context.template.engine.get_template(ITEM_TEMPLATE)
    if item.change is not None or not context.autoescape or len(item.text) > CACHED_TEXT:
        with context.push(item=item):
            return compiled.render(context)
    key = _key(compiled, item)
    html = _rendered.get(key)
    if html is None:
        html = compiled.render(context.new({"item": item}))
        if len(_rendered) >= CACHED_ITEMS:
            _rendered.clear()
        _rendered[key] = html
    return html


def cache_clear(**kwargs) -> None:
    _rendered.clear()


setting_changed.connect(cache_clear)  # a test overrode a setting the items are rendered with
