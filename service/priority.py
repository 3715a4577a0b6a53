"""Priority classes: ``critical``, ``standard``, ``sheddable`` (in that order), and which one a request has.

A request's class is its ``x-loragate-priority`` header, else its API key's default class (``priority:`` in
the keys file), else ``LORAGATE_DEFAULT_PRIORITY``. A key may use only its allowed classes (``priorities:``;
absent: its default class and the ones below it, so a key can lower its own requests but never raise them).
With auth off every class may be asked for. A class the key may not use is refused with 403, an unknown
one with 400, before the body is read.

What the class changes, only while every replica is at its in-flight limit (service/admission.py): waiting
requests get a free slot highest class first (oldest first within a class), except that a class with a share
(``LORAGATE_PRIORITY_SHARES``, ``DEFAULT_SHARES``) gets at least that share of the slots while it has
waiters, so a higher class's overload cannot starve it; ``sheddable`` ones wait less
(``LORAGATE_SHEDDABLE_MAX_WAIT_S``) and are the ones shed when the wait queue is full. The Gateway API
Inference Extension's criticality (Critical / Standard / Sheddable; now a priority whose negative values are
sheddable) is the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import Literal

from loragate.service.errors import GatewayError

PRIORITY_HEADER = "x-loragate-priority"
PriorityName = Literal["critical", "standard", "sheddable"]


class Priority(IntEnum):
    """Lower value, served first."""

    CRITICAL = 0
    STANDARD = 1
    SHEDDABLE = 2

    @property
    def label(self) -> str:
        """The name clients send and metrics show: critical, standard, sheddable."""
        return self.name.lower()


PRIORITIES = tuple(Priority)
_BY_NAME = {p.label: p for p in PRIORITIES}


def priority_named(name: str) -> Priority:
    """The class called ``name`` (as in the keys file and settings); ValueError for another name."""
    found = _BY_NAME.get(name)
    if found is None:
        raise ValueError(f"unknown priority class {name!r}: one of {', '.join(_BY_NAME)}")
    return found


class PriorityPolicy:
    """A caller's default class and the classes it may ask for; ``of(header)`` is one request's class."""

    __slots__ = ("default", "allowed")

    def __init__(self, default: Priority, allowed: Iterable[Priority] | None = None) -> None:
        self.default = default
        # absent: the default and every class below it (a caller may lower its own requests, never raise them)
        self.allowed = frozenset(allowed) if allowed is not None else frozenset(p for p in PRIORITIES if p >= default)
        if default not in self.allowed:
            raise ValueError(f"the default priority {default.label!r} must be one of the allowed ones")

    @classmethod
    def named(cls, default: str, allowed: Iterable[str] | None = None) -> PriorityPolicy:
        return cls(priority_named(default), None if allowed is None else [priority_named(a) for a in allowed])

    def of(self, header: str | None) -> Priority:
        """The class of a request whose priority header is ``header`` (None: absent); GatewayError 400 or 403."""
        if header is None:
            return self.default
        asked = _BY_NAME.get(header.strip().lower())
        if asked is None:
            shown = header[:40].encode("ascii", "replace").decode()  # a client's bytes, echoed bounded
            raise GatewayError(
                400,
                f"unknown priority class {shown!r} in {PRIORITY_HEADER}: one of {', '.join(_BY_NAME)}",
                code="invalid_priority",
                param=PRIORITY_HEADER,
            )
        if asked not in self.allowed:
            allowed = ", ".join(p.label for p in sorted(self.allowed))
            raise GatewayError(
                403,
                f"this API key may not use the priority class `{asked.label}` (allowed: {allowed})",
                code="priority_not_allowed",
                param=PRIORITY_HEADER,
            )
        return asked


# Hand-off shares (service/admission.py): of the slots freed while several classes wait, each class gets at
# least its share; 0: only slots no class with a share can use (strict lowest).
DEFAULT_SHARES = {Priority.CRITICAL: 8, Priority.STANDARD: 2, Priority.SHEDDABLE: 0}
MAX_SHARE = 1000


def check_shares(shares: Mapping[Priority, int]) -> dict[Priority, int]:
    """``shares`` with every class (absent: 0), or ValueError saying what is wrong with them.

    Each share is a whole number 0..MAX_SHARE, the top class's at least 1, and no class's above the share of a
    class above it (a lower class may be guaranteed a part of the slots, never more than a higher one)."""
    full = {p: shares.get(p, 0) for p in PRIORITIES}
    for priority, share in full.items():
        if isinstance(share, bool) or not isinstance(share, int) or not 0 <= share <= MAX_SHARE:
            raise ValueError(
                f"the share of {priority.label} must be a whole number from 0 to {MAX_SHARE}, not {share!r}"
            )
    if full[PRIORITIES[0]] < 1:
        raise ValueError(f"the share of {PRIORITIES[0].label} must be at least 1 ({_STRICT} is strict priority)")
    for higher, lower in zip(PRIORITIES, PRIORITIES[1:]):
        if full[lower] > full[higher]:
            raise ValueError(
                f"the share of {lower.label} ({full[lower]}) may not exceed the share of {higher.label} "
                f"({full[higher]}): a class never gets more of the slots than a class above it"
            )
    return full


def shares_named(text: str) -> dict[Priority, int]:
    """Shares written as in LORAGATE_PRIORITY_SHARES, ``critical=8,standard=2,sheddable=0`` (a class left out:
    0); ValueError saying what is wrong."""
    shares: dict[Priority, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{part.strip()!r} is not class=share (e.g. {format_shares(DEFAULT_SHARES)})")
        priority = priority_named(name.strip().lower())
        if priority in shares:
            raise ValueError(f"the share of {priority.label} is given twice")
        try:
            shares[priority] = int(value.strip())
        except ValueError:
            raise ValueError(f"the share of {priority.label} must be a whole number, not {value.strip()!r}") from None
    return check_shares(shares)


def format_shares(shares: Mapping[Priority, int]) -> str:
    return ",".join(f"{p.label}={shares.get(p, 0)}" for p in PRIORITIES)


_STRICT = format_shares({PRIORITIES[0]: 1})  # every other class 0


EVERY_CLASS = frozenset(PRIORITIES)


def open_policy(default: str) -> PriorityPolicy:
    """Auth off: the default class, and every class may be asked for (there is no key to restrict)."""
    return PriorityPolicy(priority_named(default), EVERY_CLASS)


def key_policy(priority: str | None, priorities: Iterable[str] | None, default: Priority) -> PriorityPolicy:
    """An API key's policy: its ``priority`` (else ``default``, else its lowest allowed class when ``default``
    is not among its ``priorities``) and its ``priorities`` (else its class and the ones below)."""
    allowed = None if priorities is None else frozenset(priority_named(p) for p in priorities)
    if priority is not None:
        own = priority_named(priority)
    elif allowed is None or default in allowed:
        own = default
    else:
        own = max(allowed)
    return PriorityPolicy(own, allowed)
