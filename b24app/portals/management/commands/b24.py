"""`manage.py b24 portals` lists portal connections; `manage.py b24 rotate-keys` re-encrypts
every stored token under the first of B24_TOKEN_KEYS; `manage.py b24 doctor PORTAL [--task ID]`
checks a live portal for what the app relies on (see `b24app/portals/doctor.py`)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from b24app.portals import selectors, services


class Command(BaseCommand):
    help = "Bitrix24 portal connections: list them, or rotate the token encryption keys."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("portals", help="list portals with state, reason and errors")
        listing.add_argument("--state", choices=["new", "active", "blocked", "uninstalled"])
        sub.add_parser("rotate-keys", help="re-encrypt all tokens under the first key")
        doctor = sub.add_parser(
            "doctor",
            help="check a live portal for what the app relies on: one line per check, "
            "ok / differs / unknown; exit status 1 when something differs",
        )
        doctor.add_argument("portal", help="the portal's domain or member_id")
        doctor.add_argument(
            "--task",
            type=int,
            help="a task id to measure the page size on and to write a result to (it is "
            "added, edited, replayed and deleted again)",
        )

    def handle(self, *args, action, **options):
        if action == "portals":
            self._portals(options.get("state"))
        elif action == "doctor":
            self._doctor(options["portal"], options.get("task"))
        else:
            self._rotate_keys()

    def _doctor(self, name: str, task_id: int | None) -> None:
        from b24app.portals.doctor import doctor_run

        portal = selectors.portal_by_name(name)
        if portal is None:
            raise CommandError(
                f"No portal {name!r}: give the domain or member_id of one installed."
            )
        if task_id is not None and task_id <= 0:
            raise CommandError("--task must be a positive task id.")
        self.stdout.write(f"{portal.domain} ({portal.member_id}), {portal.get_state_display()}")
        differs = 0
        for check in doctor_run(portal=portal, task_id=task_id):
            self.stdout.write(check.line())
            differs += check.verdict == "differs"
        if differs:
            raise CommandError(
                f"{differs} check(s) differ from what the app relies on.", returncode=1
            )

    def _portals(self, state: str | None) -> None:
        portals = selectors.portals_overview(state=state)
        header = ("DOMAIN", "MEMBER_ID", "STATE", "APP", "ACCOUNTS", "LAST SEEN", "REASON / ERROR")
        rows = [header]
        for portal in portals:
            error = portal.latest_refresh_error
            rows.append(
                (
                    portal.domain,
                    portal.member_id,
                    portal.state,
                    str(portal.app_status_label) or "-",
                    str(portal.accounts_count),
                    portal.last_seen_at.strftime("%Y-%m-%d %H:%M") if portal.last_seen_at else "-",
                    " / ".join(part for part in (portal.state_reason, error) if part) or "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            self.stdout.write("  ".join([*cells, row[-1]]).rstrip())
        self.stdout.write(f"{len(rows) - 1} portal(s)")

    def _rotate_keys(self) -> None:
        try:
            done = services.accounts_reencrypt()
        except services.ReencryptStopped as exc:
            if exc.done:
                raise CommandError(
                    f"{exc} The {exc.done} account(s) before it were re-encrypted under the first "
                    "key; no other was changed."
                ) from exc
            raise CommandError(f"{exc} Nothing was changed.") from exc
        self.stdout.write(f"Re-encrypted the tokens of {done} account(s) under the first key.")
