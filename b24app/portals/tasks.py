"""Background work about portals: thin wrappers over services, safe to run twice."""

from __future__ import annotations

import logging

from celery import shared_task

from b24app.portals import selectors, services
from b24app.portals.bitrix import BitrixError, BitrixUnavailable

logger = logging.getLogger("b24app.portals")


@shared_task(
    autoretry_for=(BitrixUnavailable,),
    retry_backoff=60,
    retry_backoff_max=3600,
    retry_jitter=True,
    max_retries=8,
)
def account_tokens_refresh_task(account_id: int, seen_version: int) -> None:
    try:
        services.account_tokens_refresh(account_id=account_id, seen_version=seen_version)
    except BitrixUnavailable:
        raise
    except BitrixError as exc:  # recorded on the account (blocked with the reason)
        logger.info("keep-alive refresh ended account=%s error=%s", account_id, exc.code)


@shared_task
def accounts_keepalive_task() -> int:
    """Daily: spend the refresh token of accounts idle for 150+ days before it dies at 180.
    Active accounts are never refreshed on a timer (Bitrix24 may block apps that do)."""
    due = selectors.accounts_keepalive_batch()
    for account_id, version in due:
        account_tokens_refresh_task.delay(account_id, version)
    logger.info("keep-alive queued %s account refreshes", len(due))
    return len(due)


@shared_task
def event_receipts_purge_task() -> int:
    """Daily: forget applied lifecycle events too old for a copy of them to arrive."""
    deleted = services.event_receipts_purge()
    logger.info("event receipts purged count=%s", deleted)
    return deleted
