"""Operators see every change people made and why one failed (read-only: the outbox is data).

Built for a large outbox (10,000 portals, 100,000 changes; `bench/scale.py`): no filter that lists
every portal and no date hierarchy (both scan the table on every page); searches that can use
indexes (a member_id exactly, a domain, a task or result id as a number); see
`b24app.adminlists`. A portal's changes: `?portal__id__exact=<portal id>`.
"""

from django.contrib import admin
from django.db.models import Q

from b24app.adminlists import PortalRowsAdmin
from results.models import ResultChange


@admin.register(ResultChange)
class ResultChangeAdmin(PortalRowsAdmin):
    list_display = (
        "id",
        "created_at",
        "portal",
        "editor",
        "action",
        "task_id",
        "result_id",
        "state",
        "attempts",
        "last_error",
        "last_error_message",
    )
    list_filter = ("state", "action")
    search_fields = ("=portal__member_id", "portal__domain")
    search_help_text = "A portal's member_id or domain, or a task or result id."
    list_select_related = ("portal", "account")

    def number_search(self, queryset, number: int):
        """A number is a task or a result id."""
        return queryset.filter(Q(task_id=number) | Q(result_id=number))

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    @admin.display(description="editor", ordering="account__user_id")
    def editor(self, change: ResultChange) -> str:
        name = change.account.display_name or "user"
        return f"{name} (#{change.account.user_id})"
