"""How much one replica would cost one request, scorer by scorer. Pure functions, no I/O.

Every scorer answers in the same unit, *requests queued ahead* (lower is better), so that weights
combine them plainly (service/picker.py): a waiting request costs 1, a running one a quarter (it
slows each decode step a little), full KV cache one more; loading an adapter costs about what a
few queued requests do; landing away from the replica whose prefix cache holds the prompt's
beginning costs what re-reading that beginning does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loragate.service.enginestate import EngineState

RUNNING_SHARE = 0.25  # a running request, in waiting-request units
KV_SHARE = 1.0  # a full KV cache (preemptions ahead), in waiting-request units
ACTIVE_COST = 0.0  # the adapter is in one of the engine's LoRA slots now
LOADED_FREE_SLOT_COST = 0.25  # registered on the engine, a LoRA slot free: a swap-in from host memory
LOADED_NO_SLOT_COST = 1.0  # registered, every slot taken: it waits for one
LOAD_COST = 3.0  # not on the replica: /v1/load_lora_adapter first (reading it from disk, then a swap-in)
EVICT_COST = 1.0  # ... and the replica is at its adapter limit: another is unloaded first
SLOTS_FULL_COST = 3.0  # ... and every LoRA slot there is busy: it would swap with the adapters running there
SPREAD_BUSY_COST = 8.0  # another replica is loading this adapter now: a second load waits for that one
PREFIX_MISS_COST = 4.0  # away from the replicas that hold the prompt's beginning in their prefix caches: more
# than a load (LOAD_COST), which is paid once, where a miss is paid by every request of the prefix


class ScorerWeights(Protocol):
    """How much each scorer counts: ``Weights`` here, or a route's ``scheduling`` (routes catalog)."""

    @property
    def load(self) -> float: ...
    @property
    def adapter(self) -> float: ...
    @property
    def prefix(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Weights:
    """The default weights (a route may set its own: loragate/common/catalog.py, ``Scheduling``)."""

    load: float = 1.0
    adapter: float = 1.0
    prefix: float = 1.0


def engine_load(engine: EngineState | None, in_flight: int, in_flight_at_scrape: int) -> tuple[float, float, float]:
    """(waiting, running, kv usage) now: the last scrape moved by the gateway's own in-flight change since.

    Requests sent since the scrape join the queue when one was waiting (else they run); requests
    finished since leave the queue first. Without a scrape (or without the series) every in-flight
    request counts as running, and KV usage as 0.
    """
    if engine is None or engine.running is None:
        return 0.0, float(in_flight), 0.0
    waiting = engine.waiting or 0.0
    running = engine.running
    delta = in_flight - in_flight_at_scrape
    if delta >= 0:
        if waiting > 0:
            waiting += delta
        else:
            running += delta
    else:
        left = waiting + delta
        waiting, running = (left, running) if left >= 0 else (0.0, max(0.0, running + left))
    return waiting, running, engine.kv_usage or 0.0


def load_cost(waiting: float, running: float, kv_usage: float) -> float:
    """Waiting requests first, then running ones, then KV-cache pressure."""
    return waiting + RUNNING_SHARE * running + KV_SHARE * kv_usage


def adapter_cost(active: bool, loaded: bool, free_slot: bool, at_limit: bool, loading_elsewhere: bool) -> float:
    """Adapter affinity: active on the replica < loaded there < loadable (a free LoRA slot, then an adapter
    unloaded to make room, then every slot busy: each costs more)."""
    if active:
        return ACTIVE_COST
    if loaded:
        return LOADED_FREE_SLOT_COST if free_slot else LOADED_NO_SLOT_COST
    cost = LOAD_COST + (EVICT_COST if at_limit else 0.0) + (0.0 if free_slot else SLOTS_FULL_COST)
    return cost + (SPREAD_BUSY_COST if loading_elsewhere else 0.0)


def prefix_cost(cached: bool) -> float:
    """Prefix-cache affinity: 0 where the prompt's beginning is likely cached (within the load bound)."""
    return 0.0 if cached else PREFIX_MISS_COST
