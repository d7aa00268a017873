"""Installed portals and their users' OAuth tokens.

A portal is its `member_id`; the domain is an attribute that can change. Each Bitrix24 user who
opened the app (or installed it) has an `Account` holding that user's tokens, encrypted with
`B24_TOKEN_KEYS`. Writes go through `services/`; reads through `selectors.py`.
"""

from __future__ import annotations

from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals import crypto
from b24app.portals.ratelimit import parse_rate


def validate_rate_limit(value: str) -> None:
    try:
        parse_rate(value)
    except ValueError as exc:
        raise ValidationError(f"{exc} (expected burst/per second, e.g. 50/2)") from exc


class Portal(models.Model):
    class State(models.TextChoices):
        NEW = "new", "New"
        ACTIVE = "active", "Active"
        BLOCKED = "blocked", "Blocked"
        UNINSTALLED = "uninstalled", "Uninstalled"

    member_id = models.CharField(max_length=64, unique=True)
    domain = models.CharField(max_length=255, db_index=True)
    client_endpoint = models.CharField(max_length=300, help_text="Portal REST root, …/rest/")
    oauth_server = models.CharField(
        max_length=200, help_text="Allow-listed OAuth server origin that vouched for the portal"
    )

    class AppStatus(models.TextChoices):
        """The app's status on the portal: the one letter Bitrix24 sends as `status` with
        tokens, `app.info` and frame POSTs (protocol §2.2, §2.7, §3.2). A letter not listed
        here is stored as it came and shown as "Unknown (X)" (`app_status_label`)."""

        FREE = "F", _("Free")
        DEMO = "D", _("Demo")
        TRIAL = "T", _("Trial")
        PAID = "P", _("Paid")
        LOCAL = "L", _("Local")
        SUBSCRIPTION = "S", _("Subscription")

    app_status = models.CharField(
        max_length=1,
        choices=AppStatus.choices,
        blank=True,
        help_text="As Bitrix24 last reported it; a letter not listed is kept as it came",
    )
    # Only a SHA-256 of the application_token is kept: it is compared, never sent anywhere.
    application_token_hash = models.CharField(max_length=64, blank=True)
    state = models.CharField(max_length=12, choices=State.choices, default=State.NEW, db_index=True)
    state_reason = models.CharField(max_length=500, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)
    blocked_by_operator = models.BooleanField(
        default=False, help_text="Blocked by an operator: only an operator unblocks it"
    )
    rate_limit = models.CharField(
        max_length=20,
        blank=True,
        validators=[validate_rate_limit],
        help_text="burst/per second, e.g. 250/5; empty: B24_RATE_LIMIT",
    )

    class Bindings(models.TextChoices):
        UNKNOWN = "", "Not checked yet"
        OK = "ok", "Bound"
        REPAIRED = "repaired", "Bound again"
        MISSING = "missing", "Missing"

    bindings = models.CharField(
        max_length=8,
        choices=Bindings.choices,
        blank=True,
        help_text="The Results tab and the lifecycle events, as Bitrix24 last listed them",
    )
    bindings_detail = models.CharField(max_length=300, blank=True)
    bindings_checked_at = models.DateTimeField(
        null=True, blank=True, help_text="Checked again a day later, or after an app update"
    )
    result_page_seen = models.PositiveIntegerField(
        default=0,
        help_text="The most results tasks.task.result.list returned in one page here (0: not "
        "known yet); a shorter page ends a list",
    )
    result_page_seen_at = models.DateTimeField(null=True, blank=True)
    uninstall_reported_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When an ONAPPUNINSTALL came that no portal admin's token could confirm: the "
        "portal and its data were kept",
    )
    uninstall_report = models.CharField(max_length=300, blank=True)
    installed_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["domain"]

    def __str__(self) -> str:
        return f"{self.domain} ({self.member_id})"

    @property
    def base_url(self) -> str:
        """`https://domain` (the client endpoint without its `rest/`)."""
        return self.client_endpoint.removesuffix("/").removesuffix("/rest")

    @property
    def origin(self) -> str:
        return self.base_url

    @property
    def app_status_label(self) -> str:
        """The app's status in words: "Free", "Trial"…; a letter Bitrix24 sent that is not one
        of `AppStatus` as "Unknown (X)"; "" when none was reported."""
        if not self.app_status:
            return ""
        if self.app_status in self.AppStatus.values:
            return str(self.get_app_status_display())
        return str(_("Unknown (%(letter)s)") % {"letter": self.app_status})

    def set_state(self, state: str, reason: str = "", *, at: datetime | None = None) -> None:
        self.blocked_by_operator = False
        self.state = state
        self.state_reason = reason[:500]
        self.state_changed_at = at or timezone.now()


class Account(models.Model):
    """One Bitrix24 user of one portal, with that user's tokens."""

    class State(models.TextChoices):
        ACTIVE = "active", "Active"
        # The refresh token was probably spent by a renewal whose answer never reached us, or
        # there is none (Bitrix24 opened the frame without REFRESH_ID) and the access token has
        # expired; only the user's next visit (fresh frame tokens) gives access back. Not their
        # fault, nor the portal's: nothing is blocked, and their changes wait instead of failing.
        WAITING = "waiting", "Waiting for the user"
        BLOCKED = "blocked", "Blocked"

    portal = models.ForeignKey(Portal, on_delete=models.CASCADE, related_name="accounts")
    user_id = models.PositiveBigIntegerField(help_text="Bitrix24 user id")
    display_name = models.CharField(max_length=255, blank=True)
    is_installer = models.BooleanField(default=False)
    is_admin = models.BooleanField(default=False)
    access_token_encrypted = models.TextField(blank=True, editable=False)
    refresh_token_encrypted = models.TextField(blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    scope = models.CharField(max_length=500, blank=True)
    token_version = models.PositiveIntegerField(
        default=0, help_text="Goes up each time a new token pair is stored"
    )
    tokens_issued_at = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="When the stored refresh token was issued"
    )
    state = models.CharField(max_length=10, choices=State.choices, default=State.ACTIVE)
    state_reason = models.CharField(max_length=500, blank=True)
    last_refreshed_at = models.DateTimeField(null=True, blank=True)
    last_refresh_error = models.CharField(max_length=500, blank=True)
    refresh_unconfirmed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When a renewal ended without an answer (timeout, lost connection, 5xx): "
        "Bitrix24 may have rotated the refresh token all the same",
    )
    refresh_from_frame = models.BooleanField(
        default=False,
        help_text="The refresh token came in a frame POST and has not been spent yet: nobody "
        "has seen it work, so its refusal proves nothing",
    )
    last_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["portal", "user_id"], name="account_unique_portal_user")
        ]
        ordering = ["portal", "user_id"]

    def __str__(self) -> str:
        return f"user {self.user_id} on {self.portal.domain}"

    @property
    def access_token(self) -> str:
        return crypto.decrypt(self.access_token_encrypted)

    @property
    def refresh_token(self) -> str:
        return crypto.decrypt(self.refresh_token_encrypted)

    @property
    def has_tokens(self) -> bool:
        """Whether the account can act as its user at all. An access token alone counts: Bitrix24
        may open the frame without `REFRESH_ID` (the docs mark it optional), and the account then
        acts until that token expires."""
        return bool(self.access_token_encrypted or self.refresh_token_encrypted)

    @property
    def can_refresh(self) -> bool:
        """Whether the account holds a refresh token to renew its access token with."""
        return bool(self.refresh_token_encrypted)


class EventReceipt(models.Model):
    """A lifecycle event we applied, by a digest of what identifies it, so that another copy of
    the same event changes nothing. Bitrix24 itself sends an event once (protocol §4.1), but
    copies still arrive: a proxy or load balancer retrying a slow upstream, a replayed request.

    The digest covers the event name, the portal and the credentials the event carried; it is a
    SHA-256, so no token is stored. Receipts older than `EVENT_RECEIPT_DAYS` are purged daily.
    """

    digest = models.CharField(max_length=64, unique=True)
    event = models.CharField(max_length=20)
    member_id = models.CharField(max_length=64)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"{self.event} for {self.member_id} at {self.received_at:%Y-%m-%d %H:%M}"
