"""Operators see every change people made and why one failed (read-only: the outbox is data)."""

from django.contrib import admin

from results.models import ResultChange


@admin.register(ResultChange)
class ResultChangeAdmin(admin.ModelAdmin):
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
    list_filter = ("state", "action", "portal")
    search_fields = ("portal__domain", "portal__member_id", "=task_id", "=result_id")
    list_select_related = ("portal", "account")
    date_hierarchy = "created_at"

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="editor", ordering="account__user_id")
    def editor(self, change: ResultChange) -> str:
        name = change.account.display_name or "user"
        return f"{name} (#{change.account.user_id})"
