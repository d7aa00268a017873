"""Background delivery of result changes: thin wrappers over `results.services`.

The services queue these tasks (after the transaction commits); each task imports the service it
runs inside its body, so this module imports no service and there is no import cycle.
"""

from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger("results")


@shared_task
def result_change_deliver_task(change_id: int) -> str:
    """One attempt; safe to run twice (the change's lease and idempotency key see to it)."""
    from results.models import ResultChange
    from results.services import result_change_deliver

    try:
        change = result_change_deliver(change_id=change_id)
    except ResultChange.DoesNotExist:
        return "gone"
    return change.state


@shared_task
def result_changes_sweep_task() -> int:
    """Every minute: queue a delivery of the due changes whose message was lost or that wait
    without one (`services.result_changes_sweep`)."""
    from results.services import result_changes_sweep

    return result_changes_sweep()


@shared_task
def result_changes_drain_task(portal_id: int, previous: list[int], since: str) -> int:
    """One step of a portal's drain (`services.result_changes_drain_step`)."""
    from results.services import result_changes_drain_step

    return result_changes_drain_step(portal_id, previous, since)


@shared_task
def result_changes_purge_task() -> int:
    """Daily: delete delivered changes (Saved, Not saved) older than `RESULTS_RETENTION_DAYS`,
    in batches (`services.PURGE_BATCH`). Queued changes are never purged."""
    from results.services import result_changes_purge

    deleted = result_changes_purge()
    logger.info("purged %s delivered change(s)", deleted)
    return deleted
