"""Registry card states follow a rollout: canary on start, stable on promote (the old stable retired),
rejected on rollback. Only for rollouts that name their cards (CanaryConfig.canary_card/stable_card).

Each move is idempotent (a card already there is left alone), so a restarted monitor that replays
a step changes nothing twice. A card that refuses a move (e.g. its weights changed: CardMismatch)
stops a start (RolloutError); on promote or rollback it is logged: the weights have already moved,
and the gateway's own card check refuses to route to it.
"""

from __future__ import annotations

import logging

from loragate.common.registry import Registry, RegistryError, read_card
from loragate.monitoring.rollout.config import CanaryConfig
from loragate.monitoring.rollout.errors import RolloutError

log = logging.getLogger("loragate.rollout")

# action -> [(which card, from states it may leave, to state)]
MOVES: dict[str, list[tuple[str, tuple[str, ...], str]]] = {
    "start": [("canary_card", ("candidate", "shadow"), "canary")],
    "promote": [("canary_card", ("candidate", "shadow", "canary"), "stable"), ("stable_card", ("stable",), "retired")],
    "rollback": [("canary_card", ("candidate", "shadow", "canary"), "rejected")],
}


def follow(spec: CanaryConfig, action: str, by: str = "loragate-rollout") -> list[str]:
    """Move the rollout's cards for ``action``; returns what changed, as ``ref: old -> new`` lines."""
    changed = []
    for which, leaves, to in MOVES.get(action, []):
        directory = getattr(spec, which)
        if directory is None:
            continue
        try:
            card = read_card(directory)
            if card.state == to or card.state not in leaves:
                continue
            if action == "promote" and which == "canary_card" and card.state != "canary":
                Registry(directory).transition(directory, "canary", by=by, reason=f"rollout of {spec.route}")
            Registry(directory).transition(directory, to, by=by, reason=f"rollout of {spec.route}: {action}")
            changed.append(f"{card.ref}: {card.state} -> {to}")
            log.info("rollout %s: card %s %s -> %s", spec.route, card.ref, card.state, to)
        except RegistryError as exc:
            if action == "start":  # no traffic to a version whose card refuses it: the rollout does not start
                raise RolloutError(f"rollout {spec.route}: card {directory} cannot become canary: {exc}") from None
            log.error("rollout %s: card %s not moved to %s: %s", spec.route, directory, to, exc)
    return changed
