"""The in-memory model of the emulator.

Everything here is plain data. The owning ``FakeBitrix`` keeps ONE
``threading.RLock`` (``fake.lock``) that guards every read-modify-write of
these objects, so counters stay exact with many concurrent clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACCESS_TTL_S = 3600  # §2.4
REFRESH_TTL_S = 180 * 24 * 3600  # §2.4: 180 days
CODE_TTL_S = 30  # §2.2
IDEMPOTENCY_TTL_S = 24 * 3600  # §5.2


@dataclass
class User:
    id: int
    name: str
    last_name: str
    admin: bool = False
    email: str = ""
    active: bool = True
    lang: str = "en"

    @property
    def full_name(self) -> str:
        return f"{self.name} {self.last_name}".strip()


@dataclass
class Task:
    id: int
    title: str
    description: str = ""
    created_by: int = 1
    responsible_id: int = 1
    members: set[int] | None = None  # None: every user has access
    completed: bool = False


@dataclass
class ResultItem:
    id: int
    task_id: int
    text: str
    author_id: int
    created_at: float
    updated_at: float | None = None
    status: str = "open"  # open | closed
    file_ids: list[int] = field(default_factory=list)
    message_id: int | None = None
    comment_id: int = 0  # classic API: 0 for results of the new task card


@dataclass
class ChatMessage:
    id: int
    task_id: int | None  # None: a message outside any task chat
    author_id: int
    text: str


@dataclass
class AccessToken:
    token: str
    member_id: str
    user_id: int
    scope: str
    expires_at: float
    revoked: bool = False
    client_id: str = ""
    """The app the token was issued to; empty: the fake's own app (``fake.client_id``)."""


@dataclass
class RefreshToken:
    token: str
    member_id: str
    user_id: int
    scope: str
    expires_at: float
    used: bool = False
    revoked: bool = False


@dataclass
class AuthCode:
    code: str
    member_id: str
    user_id: int
    scope: str
    expires_at: float
    used: bool = False


@dataclass
class PlacementBinding:
    placement: str
    handler: str
    title: str = ""
    description: str = ""
    group_name: str = ""
    lang_all: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    user_id: int = 0

    def as_dict(self) -> dict:
        # PHP serialises an empty array as [] (see placement.get in §3.4).
        return {
            "placement": self.placement,
            "userId": self.user_id,
            "handler": self.handler,
            "options": self.options or [],
            "title": self.title,
            "description": self.description,
            "langAll": self.lang_all or [],
        }

    def title_for(self, lang: str) -> str:
        entry = self.lang_all.get(lang) if isinstance(self.lang_all, dict) else None
        if isinstance(entry, dict) and entry.get("TITLE"):
            return str(entry["TITLE"])
        return self.title


@dataclass
class EventBinding:
    id: int
    event: str  # upper-case
    handler: str
    auth_type: int = 0
    offline: bool = False
    owner_user_id: int = 0

    def as_dict(self) -> dict:
        return {
            "event": self.event,
            "handler": self.handler,
            "auth_type": str(self.auth_type),
            "offline": 1 if self.offline else 0,
        }


@dataclass
class IdempotencyRecord:
    fingerprint: str
    status: int
    payload: dict
    stored_at: float


@dataclass
class FrameSession:
    """One render of an app frame (one APP_SID)."""

    app_sid: str
    user_id: int
    placement: str
    options: dict  # already with string values and URI
    handler: str
    lang: str


@dataclass
class AuthContext:
    """Who is calling a portal REST method."""

    kind: str  # "app" | "webhook"
    user: User
    scopes: set[str]
    token: AccessToken | None = None
    webhook_code: str | None = None

    @property
    def identity(self) -> str:
        """Key of the caller for the operating budget and idempotency scope."""
        return "app" if self.kind == "app" else f"webhook:{self.webhook_code}"
