"""The outbox and audit trail of every change people make to task results.

A `ResultChange` is written before anything is sent to Bitrix24 and is the only thing the
delivery works from, so a change survives busy, rate-limited or unreachable portals, worker
crashes and restarts. Its `idempotency_key` travels with every attempt, so Bitrix24 applies it
once however often it is sent.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals.models import Account, Portal


def _new_key() -> str:
    return uuid.uuid4().hex


class ResultChange(models.Model):
    class Action(models.TextChoices):
        ADD = "add", "Add"
        UPDATE = "update", "Edit"
        DELETE = "delete", "Delete"

    class State(models.TextChoices):
        QUEUED = "queued", _("Queued")
        SAVED = "saved", _("Saved")
        FAILED = "failed", _("Not saved")

    portal = models.ForeignKey(Portal, on_delete=models.CASCADE, related_name="result_changes")
    account = models.ForeignKey(
        Account, on_delete=models.CASCADE, related_name="result_changes", help_text="Who made it"
    )
    task_id = models.PositiveBigIntegerField()
    result_id = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Bitrix24 result id (for an add: once it is saved)"
    )
    action = models.CharField(max_length=6, choices=Action.choices)
    text_before = models.TextField(blank=True)
    text_after = models.TextField(blank=True)
    state = models.CharField(
        max_length=6, choices=State.choices, default=State.QUEUED, db_index=True
    )
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=120, blank=True, help_text="Bitrix24 error code")
    last_error_message = models.CharField(
        max_length=300, blank=True, help_text="The reason, as the person was told"
    )
    idempotency_key = models.CharField(max_length=64, unique=True, default=_new_key)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    lease_until = models.DateTimeField(
        null=True, blank=True, help_text="A delivery attempt owns the change until then"
    )
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    # The caps on Queued changes (`services.changes`): a Queued change holds a place among its
    # author's and among its portal's, each below the cap and unique while it is Queued, so
    # two changes written at once can never both take the last one.
    account_slot = models.PositiveIntegerField(null=True, blank=True, editable=False)
    portal_slot = models.PositiveIntegerField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["account", "account_slot"],
                condition=Q(state="queued"),
                name="resultchange_account_slot",
            ),
            models.UniqueConstraint(
                fields=["portal", "portal_slot"],
                condition=Q(state="queued"),
                name="resultchange_portal_slot",
            ),
        ]
        indexes = [
            models.Index(fields=["state", "next_attempt_at"], name="resultchange_due"),
            models.Index(fields=["portal", "task_id", "state"], name="resultchange_task"),
            # A portal's queue, oldest first (the sweep's turn per portal, the per-portal cap).
            models.Index(
                fields=["portal", "created_at"],
                condition=Q(state="queued"),
                name="resultchange_portal_queue",
            ),
            models.Index(
                fields=["account"], condition=Q(state="queued"), name="resultchange_account_queue"
            ),
            # Delivered changes by age, for the retention purge.
            models.Index(
                fields=["updated_at"], condition=~Q(state="queued"), name="resultchange_done"
            ),
        ]

    def __str__(self) -> str:
        target = f"result {self.result_id}" if self.result_id else f"task {self.task_id}"
        return f"{self.get_action_display()} {target} by user {self.account.user_id}"


class PortalOutbox(models.Model):
    """How a portal's queue is doing: its changes are delivered, or they wait together.

    When Bitrix24 is unavailable for a portal (down, busy, rate limited), the whole portal backs
    off, not each change: `failures` counts the attempts in a row that found it unavailable,
    and until `resume_at` none of its changes is sent. Then one change at a time tries (the
    probe, holding `probe_until` as its lease); its success empties `failures` and the queue
    drains. So a down portal costs one request per backoff step, however many changes wait.
    """

    portal = models.OneToOneField(
        Portal, on_delete=models.CASCADE, primary_key=True, related_name="outbox"
    )
    failures = models.PositiveIntegerField(
        default=0, help_text="Attempts in a row that found Bitrix24 unavailable"
    )
    resume_at = models.DateTimeField(
        null=True, blank=True, help_text="No change of this portal is sent before then"
    )
    probe_until = models.DateTimeField(
        null=True, blank=True, help_text="One attempt tries the portal again until then"
    )
    last_error = models.CharField(max_length=120, blank=True, help_text="Bitrix24 error code")
    drain_until = models.DateTimeField(
        null=True, blank=True, help_text="A drain queues this portal's due changes until then"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "portal outbox"

    def __str__(self) -> str:
        return f"outbox of portal {self.portal_id}"

    @property
    def held(self) -> bool:
        return self.failures > 0
