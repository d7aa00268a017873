"""factory_boy factories for the app's rows, for tests that need rows without running the
install wizard or the screen.

Every value comes from a sequence or a constant: nothing is random and nothing depends on the
date (times left to the model's defaults are "now", as when the app writes the row). The
sequences start again at each test (`_fresh_factory_sequences` in tests/conftest.py), so a test
sees the same numbers whatever ran before it.

    portal = PortalFactory()                      # portal1.bitrix24.com, member_id 000…01
    anna = AccountFactory(portal=portal, user_id=1, display_name="Anna Smirnova")
    ResultChangeFactory(account=anna, state=ResultChange.State.FAILED)
"""

from __future__ import annotations

import factory
from factory.django import DjangoModelFactory

from b24app.portals import crypto
from b24app.portals.models import Account, Portal
from results.models import PortalOutbox, ResultChange

OAUTH_SERVER = "https://oauth.bitrix.info"


class PortalFactory(DjangoModelFactory):
    """An active portal numbered `number`: member_id `f"{number:032x}"`, domain
    `portal<number>.bitrix24.com` (pass `domain=` for another), its REST root under it."""

    class Meta:
        model = Portal

    class Params:
        number = factory.Sequence(lambda n: n + 1)

    member_id = factory.LazyAttribute(lambda o: f"{o.number:032x}")
    domain = factory.LazyAttribute(lambda o: f"portal{o.number}.bitrix24.com")
    client_endpoint = factory.LazyAttribute(lambda o: f"https://{o.domain}/rest/")
    oauth_server = OAUTH_SERVER
    state = Portal.State.ACTIVE


class AccountFactory(DjangoModelFactory):
    """A user of a portal holding a working token pair, stored encrypted with
    `B24_TOKEN_KEYS` as the app stores them (`account.access_token` reads the plain one back).
    `access_token=""` / `refresh_token=""` leave one out; `without_tokens=True` leaves both."""

    class Meta:
        model = Account

    class Params:
        access_token = factory.LazyAttribute(
            lambda o: f"access-token-{o.portal.member_id}-{o.user_id}"
        )
        refresh_token = factory.LazyAttribute(
            lambda o: f"refresh-token-{o.portal.member_id}-{o.user_id}"
        )
        without_tokens = factory.Trait(access_token_encrypted="", refresh_token_encrypted="")

    portal = factory.SubFactory(PortalFactory)
    user_id = factory.Sequence(lambda n: n + 1)
    display_name = factory.LazyAttribute(lambda o: f"User {o.user_id}")
    access_token_encrypted = factory.LazyAttribute(lambda o: crypto.encrypt(o.access_token))
    refresh_token_encrypted = factory.LazyAttribute(lambda o: crypto.encrypt(o.refresh_token))


class ResultChangeFactory(DjangoModelFactory):
    """A queued addition of a result to task 1 by `account` (a new one on a new portal unless
    given), on `account`'s portal, with a sequential `idempotency_key`."""

    class Meta:
        model = ResultChange

    account = factory.SubFactory(AccountFactory)
    portal = factory.LazyAttribute(lambda o: o.account.portal)
    task_id = 1
    action = ResultChange.Action.ADD
    text_after = factory.Sequence(lambda n: f"Result {n + 1}")
    idempotency_key = factory.Sequence(lambda n: f"factory-{n + 1:024d}")


class PortalOutboxFactory(DjangoModelFactory):
    """The outbox row of a portal (a new one unless given); pass `failures` and `resume_at` for
    one that backs off."""

    class Meta:
        model = PortalOutbox

    portal = factory.SubFactory(PortalFactory)


FACTORIES = (PortalFactory, AccountFactory, ResultChangeFactory, PortalOutboxFactory)


def reset_sequences() -> None:
    """Start every factory's sequence again (at 1 for numbers, ids and texts)."""
    for model_factory in FACTORIES:
        model_factory.reset_sequence()
