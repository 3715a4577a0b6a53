"""The routes catalog against the adapter registry: never route to a version whose card says no.

A variant names its card with ``card: DIR`` (a registry version directory), or has one
implicitly when its ``path`` is a local directory holding ``card.json``. For each such variant:

- the card must verify: the sha256 of the weights and adapter config at the variant's path (or
  the card's directory) must be the card's; otherwise the whole catalog is refused;
- the card must be in a serving state (shadow, canary, stable). A variant that could get
  traffic (weight above 0, the route's shadow, or named in its fallback) with a card in another
  state refuses the catalog. A weight-0 variant with such a card (a rolled-back or retired
  version left in the file, a candidate staged before its canary) is left out of the served
  catalog, so no pin can reach it either.

Hashing the weights is the expensive part: results are cached by the files' (inode, size,
mtime), so a reload of an unchanged catalog re-reads only the small card files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loragate.common.registry import (
    CARD_FILE,
    CONFIG_FILE,
    SERVING_STATES,
    WEIGHTS_FILE,
    AdapterCard,
    CardMismatch,
    RegistryError,
    read_card,
    verify,
)

_Stamp = tuple[int, int, int]


# The catalog's objects are typed Any here: loragate.common.catalog imports this module, not the other way round.
class CardRefused(ValueError):
    """A card refuses its variant; load_catalog turns it into a CatalogError."""


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def card_dir(variant: Any) -> Path | None:
    """Where the variant's card is: ``card`` if set, else ``path`` when it is a local directory with a card."""
    if variant.card is not None:
        return Path(variant.card.removeprefix("file://"))
    if variant.path and "://" not in variant.path.removeprefix("file://"):
        path = Path(variant.path.removeprefix("file://"))
        if (path / CARD_FILE).is_file():
            return path
    return None


class CardCheck:
    """Checks a parsed catalog's variants against their cards; keeps a verify cache between loads."""

    def __init__(self) -> None:
        self._verified: dict[tuple, str | None] = {}  # key -> None (matches) or the mismatch message

    def apply(self, catalog: Any, source: str = "<routes>") -> Any:
        """The catalog to serve; raises CatalogError naming the field when a card refuses a variant."""
        routes = {}
        for name, route in catalog.routes.items():
            routes[name] = self._route(route, source)
        if all(routes[n] is catalog.routes[n] for n in routes):
            return catalog
        return catalog.model_copy(update={"routes": routes})

    def _route(self, route: Any, source: str) -> Any:
        reachable = {v.name for v in route.variants if v.weight > 0} | set(route.fallback)
        if route.shadow is not None:
            reachable.add(route.shadow.variant)
        dropped = []
        for index, variant in enumerate(route.variants):
            directory = card_dir(variant)
            if directory is None:
                continue
            field = f"{source}: routes.{route.name}.variants.{index}.{'card' if variant.card else 'path'}"
            card = self._card(directory, field)
            self._verify(card, variant, directory, field)
            if card.state not in SERVING_STATES:
                if variant.name in reachable:
                    raise CardRefused(
                        f"{field}: variant {variant.name!r} ({card.ref}) is {card.state}, not in a serving state "
                        f"({', '.join(sorted(SERVING_STATES))}); it cannot get traffic (weight {variant.weight:g}"
                        f"{', shadow' if route.shadow and route.shadow.variant == variant.name else ''}"
                        f"{', fallback' if variant.name in route.fallback else ''})"
                    )
                dropped.append(variant.name)
        if not dropped:
            return route
        return route.model_copy(update={"variants": tuple(v for v in route.variants if v.name not in dropped)})

    @staticmethod
    def _card(directory: Path, field: str) -> AdapterCard:
        try:
            return read_card(directory)
        except RegistryError as exc:
            raise CardRefused(f"{field}: {exc}") from None

    def _verify(self, card: AdapterCard, variant: Any, directory: Path, field: str) -> None:
        # The files the engine loads: the variant's path when this machine sees it, else the card's directory.
        files = directory
        if variant.path and Path(variant.path.removeprefix("file://")).is_dir():
            files = Path(variant.path.removeprefix("file://"))
        weights, config = files / WEIGHTS_FILE, files / CONFIG_FILE
        key = (str(files.resolve()), _stamp(weights), _stamp(config), card.artifact.sha256, card.artifact.config_sha256)
        if key not in self._verified:
            try:
                verify(card, files)
                self._verified[key] = None
            except CardMismatch as exc:
                self._verified[key] = str(exc)
            if len(self._verified) > 4096:  # stale stamps of replaced files; keep it bounded
                self._verified = {key: self._verified[key]}
        problem = self._verified[key]
        if problem is not None:
            raise CardRefused(f"{field}: {problem}")
