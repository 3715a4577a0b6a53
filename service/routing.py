"""Which variant serves a request. Pure functions; no I/O.

Order of precedence: a pinned variant (if the route allows pins), then the
sticky key (weighted rendezvous hashing), then a weighted random draw.

Weighted rendezvous hashing gives each (key, variant) pair a score
``weight / -ln(u)`` with ``u`` a uniform hash in (0, 1) and picks the highest.
The same key lands on the same variant while weights are unchanged, and when a
weight changes only keys that must move do move (raising a variant's weight
only pulls keys onto it; lowering it only pushes its own keys away).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from loragate.common.catalog import Route, Variant


class PinError(LookupError):
    """The request pinned a variant the route does not have or does not allow."""


@dataclass(frozen=True, slots=True)
class Choice:
    variant: Variant
    reason: str  # "pinned", "sticky" or "weighted"


def _unit_hash(key: str, variant: str) -> float:
    digest = hashlib.blake2b(f"{key}\x00{variant}".encode(), digest_size=8).digest()
    # Map to the open interval (0, 1): never 0 (log blows up) and never 1.
    return (int.from_bytes(digest, "big") + 0.5) / 2**64


def sticky_variant(route: Route, key: str) -> Variant:
    best, best_score = None, -1.0
    for variant in route.variants:
        if variant.weight <= 0:
            continue
        score = variant.weight / -math.log(_unit_hash(key, variant.name))
        if score > best_score:
            best, best_score = variant, score
    assert best is not None  # the catalog guarantees a positive weight
    return best


def weighted_variant(route: Route, rng: random.Random | None = None) -> Variant:
    live = [v for v in route.variants if v.weight > 0]
    draw = (rng or random).random() * sum(v.weight for v in live)
    for variant in live:
        draw -= variant.weight
        if draw < 0:
            return variant
    return live[-1]


def sticky_value(route: Route, headers: Mapping[str, str], payload: dict) -> str | None:
    """The caller's sticky key: the route's header, else the OpenAI ``user`` field."""
    if route.sticky_key:
        value = headers.get(route.sticky_key)
        if value:
            return value
    user = payload.get("user")
    return user if isinstance(user, str) and user else None


def choose_variant(
    route: Route,
    *,
    pinned: str | None = None,
    sticky_value: str | None = None,
    rng: random.Random | None = None,
) -> Choice:
    if pinned:
        if not route.allow_pin:
            raise PinError(f"route {route.name!r} does not allow pinning a variant")
        variant = route.variant(pinned)
        if variant is None:
            known = ", ".join(v.name for v in route.variants)
            raise PinError(f"route {route.name!r} has no variant {pinned!r} (known: {known})")
        return Choice(variant, "pinned")
    if sticky_value:
        return Choice(sticky_variant(route, sticky_value), "sticky")
    return Choice(weighted_variant(route, rng), "weighted")
