"""The operator console: portal connections, their state, errors and repair actions.

Token values are never shown: an account shows whether it has tokens and their first four
characters at most.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode

from b24app.adminlists import PortalRowsAdmin
from b24app.masking import mask_secret
from b24app.portals import selectors, services
from b24app.portals.bitrix import BitrixError
from b24app.portals.models import Account, Portal


class MaskedTokens:
    """Token columns for account pages: the first four characters, never more."""

    @admin.display(description="access token")
    def access_token_masked(self, account: Account) -> str:
        return mask_secret(account.access_token) if account.access_token_encrypted else "—"

    @admin.display(description="refresh token")
    def refresh_token_masked(self, account: Account) -> str:
        return mask_secret(account.refresh_token) if account.refresh_token_encrypted else "—"


class AccountInline(MaskedTokens, admin.TabularInline):
    model = Account
    extra = 0
    can_delete = False
    show_change_link = False
    fields = (
        "user_id",
        "display_name",
        "is_installer",
        "is_admin",
        "state",
        "state_reason",
        "access_token_masked",
        "refresh_token_masked",
        "expires_at",
        "token_version",
        "last_refreshed_at",
        "last_refresh_error",
    )
    readonly_fields = fields

    def get_queryset(self, request):
        # Each row shows the account, whose name includes its portal's domain: one join instead
        # of a query per account (a large portal has hundreds).
        return super().get_queryset(request).select_related("portal")

    def has_add_permission(self, request, obj=None):
        return False


class AppStatusFilter(admin.SimpleListFilter):
    """The app's status in words; a letter Bitrix24 sent that is not one of `Portal.AppStatus`
    is listed too, as "Unknown (X)", once a portal has it."""

    title = "app status"
    parameter_name = "app_status"

    def lookups(self, request, model_admin):
        known = Portal.AppStatus.choices
        others = (
            Portal.objects.exclude(app_status__in=[*Portal.AppStatus.values, ""])
            .order_by("app_status")
            .values_list("app_status", flat=True)
            .distinct()
        )
        return [
            *known,
            *((letter, Portal(app_status=letter).app_status_label) for letter in others),
        ]

    def queryset(self, request, queryset):
        return queryset.filter(app_status=self.value()) if self.value() else queryset


@admin.register(Portal)
class PortalAdmin(admin.ModelAdmin):
    list_display = (
        "domain",
        "member_id",
        "state",
        "state_reason",
        "app_status_shown",
        "installed_at",
        "last_seen_at",
        "accounts_count",
        "bindings",
        "last_refresh_error",
    )
    list_filter = (
        "state",
        AppStatusFilter,
        "bindings",
        ("uninstall_reported_at", admin.EmptyFieldListFilter),
    )
    search_fields = ("domain", "member_id")
    readonly_fields = (
        "member_id",
        "domain",
        "client_endpoint",
        "oauth_server",
        "app_status_shown",
        "state",
        "state_reason",
        "state_changed_at",
        "blocked_by_operator",
        "bindings",
        "bindings_detail",
        "bindings_checked_at",
        "uninstall_reported_at",
        "uninstall_report",
        "installed_at",
        "last_seen_at",
        "created_at",
        "updated_at",
    )
    fields = readonly_fields[:9] + ("rate_limit",) + readonly_fields[9:]
    inlines = [AccountInline]
    actions = [
        "verify_connection",
        "check_bindings",
        "refresh_tokens_now",
        "block",
        "unblock",
        "reconnect_via_oauth",
    ]

    def get_queryset(self, request):
        return selectors.portals_overview()

    def has_add_permission(self, request):
        return False  # portals arrive by installing the app

    @admin.display(description="accounts", ordering="accounts_count")
    def accounts_count(self, portal: Portal) -> str:
        url = reverse("admin:portals_account_changelist")
        return format_html(
            '<a href="{}?portal__id__exact={}">{}</a>', url, portal.pk, portal.accounts_count
        )

    @admin.display(description="app status", ordering="app_status")
    def app_status_shown(self, portal: Portal) -> str:
        return portal.app_status_label or self.get_empty_value_display()

    @admin.display(description="last refresh error")
    def last_refresh_error(self, portal: Portal) -> str:
        return portal.latest_refresh_error

    @admin.action(description="Verify connection (app.info)", permissions=["change"])
    def verify_connection(self, request, queryset):
        for portal in queryset:
            try:
                outcome = services.portal_verify(portal=portal)
            except services.PortalError as exc:
                self.message_user(request, f"{portal.domain}: {exc.message}", messages.ERROR)
            else:
                self.message_user(request, f"{portal.domain}: connected, app {outcome}.")

    @admin.action(description="Check bindings (bind again what is missing)", permissions=["change"])
    def check_bindings(self, request, queryset):
        for portal in queryset:
            try:
                portal = services.portal_bindings_check(portal_id=portal.pk)
            except BitrixError as exc:
                text = f"{portal.domain}: Bitrix24 did not answer ({exc.code})."
                self.message_user(request, text, messages.ERROR)
                continue
            text = portal.get_bindings_display() + (
                f": {portal.bindings_detail}" if portal.bindings_detail else ""
            )
            level = messages.SUCCESS if portal.bindings in ("ok", "repaired") else messages.ERROR
            self.message_user(request, f"{portal.domain}: {text}", level)

    @admin.action(description="Refresh tokens now", permissions=["change"])
    def refresh_tokens_now(self, request, queryset):
        for portal in queryset:
            refreshed, failed = services.portal_tokens_refresh(portal=portal)
            level = messages.ERROR if failed else messages.SUCCESS
            self.message_user(
                request, f"{portal.domain}: {refreshed} refreshed, {failed} failed.", level
            )

    @admin.action(description="Block", permissions=["change"])
    def block(self, request, queryset):
        for portal in queryset:
            services.portal_block(
                portal_id=portal.pk, reason=f"blocked by operator {request.user.get_username()}"
            )
        self.message_user(request, f"{queryset.count()} portal(s) blocked.")

    @admin.action(description="Unblock (lift an operator's block)", permissions=["change"])
    def unblock(self, request, queryset):
        for portal in queryset:
            if not portal.blocked_by_operator:
                self.message_user(
                    request, f"{portal.domain}: not blocked by an operator.", messages.WARNING
                )
                continue
            portal = services.portal_unblock(
                portal_id=portal.pk,
                reason=f"unblocked by operator {request.user.get_username()}",
            )
            level = messages.SUCCESS if portal.state == Portal.State.ACTIVE else messages.WARNING
            self.message_user(
                request,
                f"{portal.domain}: {portal.get_state_display()}, {portal.state_reason}.",
                level,
            )

    @admin.action(description="Reconnect via OAuth", permissions=["change"])
    def reconnect_via_oauth(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Reconnect one portal at a time.", messages.WARNING)
            return None
        portal = queryset.get()
        query = urlencode({"portal": portal.member_id})
        return HttpResponseRedirect(f"{reverse('portals:oauth_start')}?{query}")


@admin.register(Account)
class AccountAdmin(MaskedTokens, PortalRowsAdmin):
    """Every Bitrix24 user who installed or opened the app, across portals, paginated: a
    portal with thousands of users is read here rather than in its page's inline. Read-only;
    tokens show their first four characters at most. One portal's accounts:
    `?portal__id__exact=<portal id>` (the portal list's account count links there)."""

    list_display = (
        "user_id",
        "display_name",
        "portal",
        "state",
        "is_installer",
        "is_admin",
        "last_seen_at",
        "last_refreshed_at",
        "last_refresh_error",
    )
    list_filter = ("state", "is_installer", "is_admin")
    search_fields = ("=portal__member_id", "portal__domain", "display_name")
    search_help_text = "A portal's member_id or domain, a name, or a Bitrix24 user id."
    list_select_related = ("portal",)
    fields = (
        "portal",
        *AccountInline.fields,
        "refresh_unconfirmed_at",
        "refresh_from_frame",
        "tokens_issued_at",
        "last_seen_at",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields

    def number_search(self, queryset, number: int):
        """A number is a Bitrix24 user id."""
        return queryset.filter(user_id=number)
