"""What people do with task results: read them from Bitrix24 and change them, nothing lost.

Every add, edit and delete is validated, written as a `ResultChange` (the outbox), then sent with
the editor's own token through REST 3.0 under the change's `Idempotency-Key`. The web request
tries once, quickly; whatever is still queued is delivered by Celery with exponential backoff and
jitter, honouring the portal's shared request budget and `operating_reset_at`. Refusals end as
"Not saved" with a reason a person understands; `Retry` queues the change again.

The modules, each importable on its own:

- `reading`: a task's results, with the person's undelivered changes laid over them;
- `changes`: a change submitted or retried, and the outbox's upkeep (resume, purge);
- `delivery`: one delivery attempt of a change;
- `outbox`: a portal that backs off as one, and the turns in its request budget;
- `schedule`: when queued changes are handed to the workers (the Celery tasks);
- `backoff`: the delivery's timings;
- `frames`: frame requests, and the admin's "Bind again".

Services answer with domain outcomes and exceptions; the HTTP statuses they become are the
view layer's (`results.http`).
"""

from results.services.backoff import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    CLOCK_SKEW,
    DEFER_AFTER_SLOTS,
    DEFERRED,
    GIVE_UP_AFTER,
    LEASE,
    MAX_DELAY_S,
    NOT_SENT,
    PORTAL_LIMIT_CODES,
    backoff_delay,
)
from results.services.changes import (
    MAX_TEXT_LENGTH,
    PURGE_BATCH,
    ChangeNotFound,
    QueueFull,
    ResultError,
    result_change_resend,
    result_change_retry,
    result_change_submit,
    result_changes_purge,
    result_changes_resume,
)
from results.services.delivery import result_change_deliver, result_changes_poll
from results.services.frames import (
    Frame,
    Rebind,
    RebindOutcome,
    frame_issue,
    frame_open,
    frame_renew,
    frame_resolve,
    portal_rebind,
)
from results.services.reading import (
    ResultItem,
    ScreenUnavailable,
    TaskResults,
    Unreadable,
    result_item_of_change,
    results_fetch,
    results_for_screen,
    results_pending_only,
)
from results.services.schedule import (
    DRAIN_PATIENCE,
    DRAIN_STEP_MIN_S,
    delivers_inline,
    portal_drain_claim,
    portal_drain_done,
    result_change_schedule,
    result_changes_drain,
    result_changes_drain_step,
    result_changes_sweep,
)

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "CLOCK_SKEW",
    "DEFERRED",
    "DEFER_AFTER_SLOTS",
    "DRAIN_PATIENCE",
    "DRAIN_STEP_MIN_S",
    "GIVE_UP_AFTER",
    "LEASE",
    "MAX_DELAY_S",
    "MAX_TEXT_LENGTH",
    "NOT_SENT",
    "PORTAL_LIMIT_CODES",
    "PURGE_BATCH",
    "ChangeNotFound",
    "Frame",
    "QueueFull",
    "Rebind",
    "RebindOutcome",
    "ResultError",
    "ResultItem",
    "ScreenUnavailable",
    "TaskResults",
    "Unreadable",
    "backoff_delay",
    "delivers_inline",
    "frame_issue",
    "frame_open",
    "frame_renew",
    "frame_resolve",
    "portal_drain_claim",
    "portal_drain_done",
    "portal_rebind",
    "result_change_deliver",
    "result_change_resend",
    "result_change_retry",
    "result_change_schedule",
    "result_change_submit",
    "result_changes_drain",
    "result_changes_drain_step",
    "result_changes_poll",
    "result_changes_purge",
    "result_changes_resume",
    "result_changes_sweep",
    "result_item_of_change",
    "results_fetch",
    "results_for_screen",
    "results_pending_only",
]
