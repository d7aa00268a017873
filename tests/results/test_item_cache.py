"""The list's items come from a per-process cache of rendered items (`{% result_item %}`):
byte for byte what `{% include "results/_item.html" %}` renders, whatever the language, the
item's fields or its change, on the first rendering and the cached one."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.template import Context, engines
from django.utils import translation

from results.models import ResultChange
from results.services.reading import ResultItem
from results.templatetags import result_items

MOSCOW = timezone(timedelta(hours=3))

LIST = "{% load result_items %}{% for item in results %}{% result_item item %}{% endfor %}"
INCLUDED = '{% for item in results %}{% include "results/_item.html" %}{% endfor %}'


def _items() -> list[ResultItem]:
    created = datetime(2026, 11, 5, 9, 30, tzinfo=UTC)
    return [
        ResultItem(
            id=7,
            text='Figures <b>checked</b> & "sent"\nsecond line',
            author_id=1,
            author_name="Anna <Smirnova>",
            created_at=created,
            updated_at=datetime(2026, 11, 6, 12, 0, 5, 120, tzinfo=MOSCOW),
            closed=True,
            can_edit=True,
            can_remove=True,
        ),
        # The same instant in another offset: equal datetimes, different HTML.
        ResultItem(7, "x", 1, "Anna", created.astimezone(MOSCOW), None, False, True, False),
        ResultItem(7, "x", 1, "Anna", created, None, False, True, False),
        ResultItem(8, "y", 2, "Boris", None, None, False, False, True, pending_delete=True),
        ResultItem(0, "new", 2, "Boris", created, None, False, False, False),
    ]


def _render(source: str, results, **context) -> str:
    compiled = engines["django"].from_string(source)
    return compiled.template.render(Context({"results": results, **context}))


@pytest.mark.parametrize("language", ["en", "ru", "de"])
def test_cached_items_are_the_included_template_byte_for_byte(language):
    result_items.cache_clear()
    items = _items()
    with translation.override(language):
        included = _render(INCLUDED, items)
        assert _render(LIST, items) == included  # rendered, then kept
        assert _render(LIST, items) == included  # from the cache
        assert len(result_items._rendered) == len(items)


def test_the_cache_is_per_language():
    result_items.cache_clear()
    items = _items()[:1]
    with translation.override("en"):
        english = _render(LIST, items)
    with translation.override("ru"):
        russian = _render(LIST, items)
        assert russian == _render(INCLUDED, items)
    assert english != russian


@pytest.mark.django_db
def test_an_item_with_a_change_is_rendered_in_the_whole_context_every_time():
    result_items.cache_clear()
    change = ResultChange(pk=5, state=ResultChange.State.FAILED, last_error_message="Refused")
    item = ResultItem(9, "z", 1, "Anna", None, None, False, True, True, change=change)
    context = {"frame_field": "frame", "frame_token": "token-1"}
    html = _render(LIST, [item], **context)
    assert html == _render(INCLUDED, [item], **context)
    assert 'value="token-1"' in html
    assert not result_items._rendered


def test_a_long_text_is_rendered_every_time():
    result_items.cache_clear()
    text = "x" * (result_items.CACHED_TEXT + 1)
    item = ResultItem(9, text, 1, "Anna", None, None, False, True, True)
    assert _render(LIST, [item]) == _render(INCLUDED, [item])
    assert not result_items._rendered
