"""What the app binds on each portal, read and bound through a REST client (no database).

The app needs three registrations on every portal: the Results tab (`placement.bind` of
`TASK_VIEW_TAB` to `…/b24/app/`) and the lifecycle events `ONAPPUNINSTALL` and `ONAPPUPDATE`
(`event.bind` to `…/b24/events/`). Bitrix24 deletes an app's event bindings when the app is
updated (`event.bind` docs: bind again "in the installer of each version"); whether placements
survive an update is not documented. `placement.get`/`event.get` need a portal admin's token
(non-admins see only their own event handlers).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from b24app.portals.bitrix import BitrixClient, methods

TASK_TAB = "TASK_VIEW_TAB"
TASK_TAB_TITLES = {"en": "Results", "ru": "Результаты"}
LIFECYCLE_EVENTS = ("ONAPPUNINSTALL", "ONAPPUPDATE")
BINDINGS = (TASK_TAB, *LIFECYCLE_EVENTS)
CHECK_EVERY = timedelta(days=1)
"""A portal's bindings are read again at most this often (by the daily job or an admin's open)."""
APP_PATH = "/b24/app/"
EVENTS_PATH = "/b24/events/"


@dataclass(frozen=True)
class Bound:
    """What a portal lists as bound to this app."""

    placements: frozenset[tuple[str, str]]
    """(placement code, handler URL)"""
    events: frozenset[tuple[str, str]]
    """(upper-case event name, handler URL)"""

    def missing(self, app_url: str) -> list[str]:
        """The app's bindings (of :data:`BINDINGS`) that are not there for ``app_url``."""
        missing = [] if (TASK_TAB, app_url + APP_PATH) in self.placements else [TASK_TAB]
        return missing + [
            event for event in LIFECYCLE_EVENTS if (event, app_url + EVENTS_PATH) not in self.events
        ]

    def app_url(self) -> str | None:
        """The app's base URL as the portal has it bound, when some binding of ours is left."""
        for placement, handler in sorted(self.placements):
            if placement == TASK_TAB and handler.endswith(APP_PATH):
                return handler.removesuffix(APP_PATH)
        for event, handler in sorted(self.events):
            if event in LIFECYCLE_EVENTS and handler.endswith(EVENTS_PATH):
                return handler.removesuffix(EVENTS_PATH)
        return None


def bindings_read(client: BitrixClient) -> Bound:
    """`placement.get` and `event.get`, reduced to what tells our bindings apart."""
    return Bound(
        placements=frozenset(
            (binding.name, binding.handler) for binding in methods.placements_list(client)
        ),
        events=frozenset(
            (binding.name, binding.handler) for binding in methods.events_list(client)
        ),
    )


def binding_add(client: BitrixClient, name: str, app_url: str) -> None:
    """Bind one of :data:`BINDINGS` to this app at ``app_url``."""
    if name == TASK_TAB:
        methods.placement_bind(client, TASK_TAB, app_url + APP_PATH, TASK_TAB_TITLES)
    else:
        methods.event_bind(client, name, app_url + EVENTS_PATH)


def bindings_ensure(client: BitrixClient, app_url: str) -> list[str]:
    """Bind whatever of :data:`BINDINGS` is missing (idempotent: read first); returns what was
    bound. Raises the first `BitrixError`."""
    missing = bindings_read(client).missing(app_url)
    for name in missing:
        binding_add(client, name, app_url)
    return missing
