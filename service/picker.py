"""The picker: which replica serves one request, by weighted scorers (service/scorers.py).

It looks at a few candidates, not at every replica, so its cost stays flat as replicas are added:
the replicas the prompt's prefix was sent to lately, within the load bound, or else its home on the
bounded-load hash ring (service/prefixring.py), up to
``MAX_HOLDERS`` replicas that hold the adapter, and ``sample`` replicas drawn at random (the
"power of two choices", which alone keeps loads within a small margin of even). Each candidate
costs load + adapter affinity + prefix affinity, weighted; the cheapest wins, and the scorer that
separated it from the runner-up is named (a bounded label for the metrics and explanations).

A hot adapter spreads by the same arithmetic: once its holders cost more than a replica without it
plus a load (``LOAD_COST``), that replica wins and loads it; a second load of the same adapter elsewhere
costs ``SPREAD_BUSY_COST`` more while one is under way, so concurrent requests share one load.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loragate.service.prefixring import PrefixMemory, PrefixRing, load_bound
from loragate.service.replicas import Replica
from loragate.service.scorers import ScorerWeights, Weights, adapter_cost, engine_load, load_cost, prefix_cost

MAX_HOLDERS = 2
SCORERS = ("load", "adapter", "prefix")  # the bounded values of the decision label, with "only"


@dataclass(frozen=True, slots=True)
class Pick:
    replica: Replica
    scorer: str  # which scorer decided: load, adapter, prefix, or only (a single candidate)
    load: bool  # the adapter must be loaded on the replica first


class Picker:
    def __init__(self, *, sample: int = 2, bound_c: float = 1.25, rng: random.Random | None = None) -> None:
        self.sample = sample
        self.bound_c = bound_c
        self.rng = rng or random.Random()
        self.ring: PrefixRing[Replica] = PrefixRing([], _url)
        self.memory: PrefixMemory[Replica] = PrefixMemory()

    def update(self, replicas: Sequence[Replica]) -> None:
        """The replica set changed: a new ring (keys of replicas that stay, stay); those gone are forgotten."""
        for gone in set(self.ring.members) - set(replicas):
            self.memory.forget(gone)
        self.ring = PrefixRing(list(replicas), _url)

    def pick(
        self,
        replicas: Sequence[Replica],
        usable: Callable[[Replica], bool],
        *,
        adapter: str | None,
        can_load: Callable[[Replica], bool],
        prefix: int | None,
        holders: Sequence[Replica] = (),
        loading_elsewhere: bool = False,
        adapter_limit: int | None = None,
        total_in_flight: int = 0,
        weights: ScorerWeights = Weights(),
        exhaustive: bool = False,
    ) -> Pick | None:
        """The cheapest usable candidate, or None when none of those looked at is usable.

        ``holders``: the replicas that hold ``adapter`` or are loading it (the replica set's index).
        ``exhaustive``: look at every replica instead of a sample (the caller's second try).
        """
        candidates: list[Replica] = []
        n = len(replicas)
        near: list[Replica] = []  # where the prefix is likely cached, within the load bound
        if prefix is not None and n > 1 and weights.prefix > 0:
            bound = load_bound(total_in_flight, n, self.bound_c)

            def fits(r: Replica) -> bool:
                return r.in_flight < bound and usable(r) and (adapter is None or r.holds(adapter) or can_load(r))

            near = [r for r in self.memory.get(prefix) if fits(r)]
            if not near:  # a new prefix, or every replica that had it is over the bound: the ring says where
                home = self.ring.home(prefix, fits)
                if home is not None:
                    near.append(home)
            candidates.extend(near)
        draw = self.rng.randrange
        if holders:
            h = len(holders)
            for r in holders if h <= MAX_HOLDERS else [holders[draw(h)] for _ in range(MAX_HOLDERS)]:
                if r not in candidates and usable(r):
                    candidates.append(r)
        drawn = replicas if exhaustive or n <= self.sample + 1 else [replicas[draw(n)] for _ in range(self.sample)]
        for r in drawn:  # a repeated draw only means one candidate fewer
            if r not in candidates and usable(r) and (adapter is None or r.holds(adapter) or can_load(r)):
                candidates.append(r)
        if not candidates:
            return None
        w_load, w_adapter, w_prefix = weights.load, weights.adapter, weights.prefix
        best = runner = (0.0, 0.0, 0.0)
        best_total = runner_total = float("inf")
        winner = candidates[0]
        for r in candidates:
            load = w_load * load_cost(*engine_load(r.engine, r.in_flight, r.engine_in_flight))
            if adapter is None:
                affinity = 0.0
            else:
                active = r.is_active(adapter)
                affinity = w_adapter * adapter_cost(  # positional: the picker's hot loop
                    active,
                    active or r.holds(adapter),
                    active or r.free_lora_slot(),
                    adapter_limit is not None and len(r.adapters) >= adapter_limit,
                    loading_elsewhere,
                )
            cached = 0.0 if prefix is None or not near else w_prefix * prefix_cost(r in near)
            total = load + affinity + cached
            if total < best_total:
                runner, runner_total = best, best_total
                best, best_total, winner = (load, affinity, cached), total, r
            elif total < runner_total:
                runner, runner_total = (load, affinity, cached), total
        if runner_total == float("inf"):
            scorer = "only"
        else:
            gaps = (runner[0] - best[0], runner[1] - best[1], runner[2] - best[2])
            scorer = SCORERS[gaps.index(max(gaps))]
        if prefix is not None:
            self.memory.record(prefix, winner)
        return Pick(winner, scorer, adapter is not None and not winner.holds(adapter))


def _url(replica: Replica) -> str:
    return replica.url
