"""Background work about portals: thin wrappers over services, safe to run twice."""

from __future__ import annotations

import logging

from celery import shared_task

from b24app.portals import selectors, services
from b24app.portals.bitrix import BitrixError, BitrixUnavailable
from b24app.portals.models import Portal
from b24app.portals.ratelimit import BACKGROUND_LIMITER_WAIT_S

logger = logging.getLogger("b24app.portals")

RETRY_WHILE_UNAVAILABLE = {
    "autoretry_for": (BitrixUnavailable,),
    "retry_backoff": 60,
    "retry_backoff_max": 3600,
    "retry_jitter": True,
}
"""Bitrix24 busy or unreachable: try again from a minute up to an hour later, with jitter."""


@shared_task(**RETRY_WHILE_UNAVAILABLE, max_retries=8)
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


@shared_task(**RETRY_WHILE_UNAVAILABLE, max_retries=6)
def portal_bindings_check_task(
    portal_id: int, account_id: int | None = None, app_url: str = "", settled: bool = True
) -> str:
    """Read a portal's bindings and bind again what is missing; safe to run twice (it reads
    before it binds)."""
    try:
        portal = services.portal_bindings_check(
            portal_id=portal_id,
            account_id=account_id,
            app_url=app_url,
            settled=settled,
            limiter_max_wait=BACKGROUND_LIMITER_WAIT_S,
        )
    except Portal.DoesNotExist:
        return "gone"
    return portal.bindings


@shared_task
def portals_bindings_check_task() -> int:
    """Daily: check the bindings of portals not checked for a day (an app update may have
    dropped the uninstall event, and nobody opened the app since)."""
    due = selectors.portals_bindings_due()
    for portal_id in due:
        portal_bindings_check_task.delay(portal_id)
    logger.info("bindings checks queued count=%s", len(due))
    return len(due)
