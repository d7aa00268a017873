"""What the operator's read-only lists over per-portal rows (accounts, result changes) share.

Those tables grow with every portal (100,000 rows and more; `bench/scale.py`), so the lists
search with indexes, skip the second COUNT(*) a search costs, and are narrowed to one portal
by `?portal__id__exact=<portal id>` rather than by a sidebar filter listing every portal.
"""

from __future__ import annotations

from django.contrib import admin

from b24app.ids import parse_id


class PortalRowsAdmin(admin.ModelAdmin):
    """A read-only list of rows that belong to portals. A search term that is a number goes to
    `number_search` (compared as a number, so indexes apply); any other to `search_fields`."""

    show_full_result_count = False

    def number_search(self, queryset, number: int):
        """The rows a numeric search term names (override)."""
        raise NotImplementedError

    def lookup_allowed(self, lookup, value, request=None):
        return lookup == "portal__id__exact" or super().lookup_allowed(lookup, value, request)

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        number = parse_id(term)
        if number is not None:
            return self.number_search(queryset, number), False
        return super().get_search_results(request, queryset, search_term)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
