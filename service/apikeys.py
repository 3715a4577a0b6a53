"""API keys: the keys file (only their hashes), parsed, checked and reloaded when it changes.

Keys are never stored: the keys file holds the SHA-256 (hex) of each key. The
file is YAML (JSON is YAML too), reloaded when it changes; a bad edit keeps
the last good set of keys::

    # deploy/api-keys.example.yaml
    keys:
      - id: team-support          # safe to log and to use as a metric label: [A-Za-z0-9._-], at most 64
        sha256: "9f86d08..."      # sha256 hex of the key, quoted; `loragate hash-key` makes a key and this entry
        routes: [support, plain]  # route names this key may call, or "*" for every route
        requests_per_minute: 600  # optional; absent means no limit
        tokens_per_minute: 200000 # optional; prompt + completion tokens, charged after each answer
        revoked: false            # true: the key is refused with 401 (takes effect on the next reload)
        team: support             # optional; the team's budgets (LORAGATE_TEAM_BUDGETS) apply to it too
        usd_per_day: 20           # optional spend budgets in USD (service/budgets.py)
        usd_per_month: 400
        priority: standard        # optional: the class of its requests without x-loragate-priority
                                  # (critical, standard, sheddable; absent: LORAGATE_DEFAULT_PRIORITY)
        priorities: [standard, sheddable]  # optional: the classes it may ask for (absent: its class and
                                  # the ones below it; service/priority.py)

The same document may also be given inline in ``LORAGATE_API_KEYS`` (its keys are
added to the file's).
The keys are checked on each request by service/auth.py.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loragate.common.watched import ReloadingFile
from loragate.service.priority import PriorityName

KEY_PREFIX = "lg-"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class KeysError(ValueError):
    """The keys file cannot be used; the message says why and where (never a key)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    sha256: str
    routes: Literal["*"] | tuple[str, ...] = "*"
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    revoked: bool = False
    team: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # its team's budgets apply too
    usd_per_day: float | None = Field(None, gt=0)  # spend budget (service/budgets.py); absent: none
    usd_per_month: float | None = Field(None, gt=0)
    priority: PriorityName | None = None  # its requests' class without a header (None: the gateway's default)
    priorities: tuple[PriorityName, ...] | None = None  # the classes it may ask for (None: its class and below)

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(f"key id {value!r} must match {_ID.pattern}")
        return value

    @field_validator("sha256", mode="before")
    @classmethod
    def _valid_hash(cls, value: object) -> object:
        value = value.strip().lower() if isinstance(value, str) else None
        if value is None or not _SHA256.match(value):
            # Never echo the value: it may be a key pasted by mistake.
            raise ValueError("must be the SHA-256 of the key: 64 hex digits in quotes (see `loragate hash-key`)")
        return value

    @model_validator(mode="after")
    def _default_is_allowed(self) -> ApiKey:
        if self.priority is not None and self.priorities is not None and self.priority not in self.priorities:
            raise ValueError(f"priority {self.priority!r} must be one of its priorities {list(self.priorities)}")
        return self

    def allows(self, route: str) -> bool:
        return self.routes == "*" or route in self.routes

    def public(self) -> dict:
        """What an admin may see: everything but the hash."""
        return self.model_dump(exclude={"sha256"})


class _KeysDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = []


def parse_keys(text: str, source: str) -> list[ApiKey]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # The YAML error quotes the offending line, which may hold a key: say only where.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise KeysError(f"{source}: not valid YAML{where}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise KeysError(f"{source}: expected a mapping with a 'keys' list")
    try:
        return _KeysDocument.model_validate(data).keys
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise KeysError(f"{source}: {problems}") from None


def index_keys(keys: Iterable[ApiKey]) -> dict[str, ApiKey]:
    """Keys by hash; ids and hashes must be unique."""
    by_hash: dict[str, ApiKey] = {}
    ids: set[str] = set()
    for key in keys:
        if key.id in ids:
            raise KeysError(f"duplicate key id {key.id!r}")
        if key.sha256 in by_hash:
            raise KeysError(f"keys {by_hash[key.sha256].id!r} and {key.id!r} have the same hash")
        ids.add(key.id)
        by_hash[key.sha256] = key
    return by_hash


class KeyStore:
    """The keys from a file (optional) plus inline ones, reloaded when the file changes; keeps the last good."""

    def __init__(self, path: Path | None = None, inline: str | None = None) -> None:
        self.path = path
        self._inline = parse_keys(inline, "LORAGATE_API_KEYS") if inline else []
        self._file = ReloadingFile(path, lambda: index_keys([*self._inline, *self._load_file()]))

    @property
    def by_hash(self) -> dict[str, ApiKey]:
        return self._file.current

    @property
    def last_error(self) -> str | None:
        return self._file.last_error

    def _load_file(self) -> list[ApiKey]:
        if self.path is None:
            return []
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise KeysError(f"{self.path}: cannot read: {exc.strerror}") from None
        return parse_keys(text, str(self.path))

    def reload_if_changed(self) -> bool:
        """True when new keys were loaded; raises KeysError on a bad file (the last good keys stay)."""
        return self._file.reload_if_changed()

    def keys(self) -> list[ApiKey]:
        return sorted(self.by_hash.values(), key=lambda k: k.id)
