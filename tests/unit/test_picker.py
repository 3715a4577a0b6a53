"""The replica picker and its parts: scorers, the prefix ring, the LRU unload choice (no I/O)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loragate.service.adapterloads import unload_victim
from loragate.service.enginestate import EngineState
from loragate.service.picker import Picker
from loragate.service.prefixring import (
    MIN_PREFIX_CHARS,
    PREFIX_CHARS,
    PrefixRing,
    load_bound,
    prefix_key,
    prompt_prefix,
)
from loragate.service.replicas import Replica
from loragate.service.scorers import (
    Weights,
    adapter_cost,
    engine_load,
    load_cost,
    prefix_cost,
)

# --- scorers ------------------------------------------------------------------


def test_load_orders_waiting_then_running_then_kv():
    assert load_cost(1, 0, 0) > load_cost(0, 3, 0) > load_cost(0, 0, 0.5) > load_cost(0, 0, 0)


def test_engine_load_moves_the_scrape_by_the_gateways_own_requests():
    engine = EngineState(running=4, waiting=0, kv_usage=0.5)
    assert engine_load(engine, 6, 4) == (0, 6, 0.5)  # two sent since, none waiting: they run
    queued = EngineState(running=8, waiting=2, kv_usage=0.9)
    assert engine_load(queued, 7, 4) == (5, 8, 0.9)  # three sent since join the queue
    assert engine_load(queued, 1, 4) == (0, 7, 0.9)  # three finished: the queue first, then one running
    assert engine_load(None, 5, 0) == (0, 5, 0)  # no scrape: the gateway's own count
    assert engine_load(EngineState(), 5, 0) == (0, 5, 0)  # a scrape without the series: the same


def test_adapter_affinity_active_over_loaded_over_loadable():
    active = adapter_cost(active=True, loaded=True, free_slot=False, at_limit=False, loading_elsewhere=False)
    loaded_free = adapter_cost(active=False, loaded=True, free_slot=True, at_limit=False, loading_elsewhere=False)
    loaded_full = adapter_cost(active=False, loaded=True, free_slot=False, at_limit=False, loading_elsewhere=False)
    loadable = adapter_cost(active=False, loaded=False, free_slot=True, at_limit=False, loading_elsewhere=False)
    evicting = adapter_cost(active=False, loaded=False, free_slot=True, at_limit=True, loading_elsewhere=False)
    second = adapter_cost(active=False, loaded=False, free_slot=True, at_limit=False, loading_elsewhere=True)
    assert active < loaded_free < loaded_full < loadable < evicting < second


def test_prefix_cost_is_zero_only_at_home():
    assert prefix_cost(True) == 0 < prefix_cost(False)


# --- the prefix ring ------------------------------------------------------------


def _replicas(n: int) -> list[Replica]:
    return [Replica(f"http://10.0.0.{i}:8000", healthy=True) for i in range(n)]


def test_ring_shares_keys_evenly_and_moves_few_when_a_replica_joins():
    replicas = _replicas(8)
    ring = PrefixRing(replicas, lambda r: r.url)
    keys = [prefix_key(None, f"system prompt {i}") for i in range(8000)]
    homes = [ring.home(k, lambda r: True) for k in keys]
    shares = Counter(id(h) for h in homes)
    assert max(shares.values()) < 1.5 * 1000 and min(shares.values()) > 0.5 * 1000
    grown = PrefixRing([*replicas, Replica("http://10.0.0.99:8000")], lambda r: r.url)
    moved = sum(1 for k, h in zip(keys, homes) if grown.home(k, lambda r: True) is not h)
    assert moved < 8000 * 0.2  # ~1/9 must move to the new one; nothing else should


def test_ring_passes_a_full_home_on_to_the_next_and_gives_up_when_none_fits():
    replicas = _replicas(4)
    ring = PrefixRing(replicas, lambda r: r.url)
    key = prefix_key(None, "x" * 100)
    home = ring.home(key, lambda r: True)
    assert home is not None
    other = ring.home(key, lambda r: r is not home)
    assert other is not None and other is not home
    assert ring.home(key, lambda r: False) is None
    assert PrefixRing([], lambda r: r.url).home(key, lambda r: True) is None


def test_load_bound_is_c_times_the_mean_counting_this_request():
    assert load_bound(15, 4, 1.25, slack=0) == pytest.approx(5.0)
    assert load_bound(15, 4, 1.25) == pytest.approx(9.0)
    assert load_bound(0, 64) > 0


def test_prompt_prefix_takes_the_leading_text_of_chats_and_prompts():
    system = "You are a support agent for ACME. " * 4
    chat = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "first question"}]}
    later = {
        "messages": [
            *chat["messages"],
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": "second question"},
        ]
    }
    assert prompt_prefix(chat) == prompt_prefix(later)  # the same conversation keeps its key
    assert len(prompt_prefix({"messages": [{"role": "user", "content": "y" * 10_000}]})) == PREFIX_CHARS
    other = {"messages": [chat["messages"][0], {"role": "user", "content": "another conversation"}]}
    assert prompt_prefix(other) != prompt_prefix(chat)  # a short system prompt: the first turn counts too
    long_system = {"role": "system", "content": "z" * PREFIX_CHARS}
    assert prompt_prefix({"messages": [long_system, {"role": "user", "content": "one"}]}) == prompt_prefix(
        {"messages": [long_system, {"role": "user", "content": "two"}]}
    )  # the system prompt
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": system}, {"type": "image_url"}]}]}
    assert prompt_prefix(parts) == "\x1e" + system  # the text parts
    assert prompt_prefix({"messages": [{"role": "user", "content": "hi"}]}) is None  # too short to share
    assert prompt_prefix({"prompt": "p" * MIN_PREFIX_CHARS}) == "p" * MIN_PREFIX_CHARS
    assert prompt_prefix({"prompt": ["q" * 80, "r"]}) == "q" * 80
    for odd in ({}, {"messages": "text"}, {"messages": [1, None, {"content": 5}]}, {"prompt": 7}, {"prompt": []}):
        assert prompt_prefix(odd) is None
    assert prefix_key("a1", system) != prefix_key("a2", system)  # prefix caches are per adapter


# --- the picker -------------------------------------------------------------------


def pick(
    picker: Picker,
    replicas: list[Replica],
    adapter: str | None = None,
    prefix: int | None = None,
    can_load: bool = True,
    **kwargs,
):
    return picker.pick(
        replicas,
        lambda r: r.healthy,
        adapter=adapter,
        can_load=lambda r: can_load,
        prefix=prefix,
        holders=[r for r in replicas if adapter and r.holds(adapter)],
        total_in_flight=sum(r.in_flight for r in replicas),
        **kwargs,
    )


def test_least_loaded_wins_and_the_deciding_scorer_is_named():
    replicas = _replicas(2)
    replicas[0].in_flight = 5
    chosen = pick(Picker(rng=random.Random(1)), replicas)
    assert chosen.replica is replicas[1] and chosen.scorer == "load" and not chosen.load


def test_scraped_queue_outweighs_gateway_counts():
    replicas = _replicas(2)
    replicas[0].engine = EngineState(running=8, waiting=6, kv_usage=0.9)  # another gateway filled it
    replicas[1].in_flight = 2
    replicas[1].engine = EngineState(running=2, waiting=0, kv_usage=0.1)
    replicas[1].engine_in_flight = 2
    assert pick(Picker(), replicas).replica is replicas[1]


def test_holder_wins_until_its_queue_costs_more_than_a_load_then_the_adapter_spreads():
    replicas = _replicas(2)
    holder, other = replicas
    holder.adapters.add("a1")
    holder.in_flight = 4  # 4 running: 1.0 of load, less than a load on the other
    chosen = pick(Picker(), replicas, "a1")
    assert chosen.replica is holder and not chosen.load
    holder.in_flight = 20  # 5.0 of load: more than loading it (3.0) on an idle replica
    chosen = pick(Picker(), replicas, "a1")
    assert chosen.replica is other and chosen.load and chosen.scorer == "load"
    # While that load runs, a third replica does not start another one.
    third = Replica("http://10.0.0.9:8000", healthy=True)
    other.loading["a1"] = None  # type: ignore[assignment]  # a load under way
    other.in_flight = 3
    chosen = pick(Picker(), [holder, other, third], "a1", loading_elsewhere=True)
    assert chosen.replica is other and not chosen.load


def test_an_adapter_that_cannot_be_loaded_stays_with_its_holders():
    replicas = _replicas(2)
    replicas[0].adapters.add("a1")
    replicas[0].in_flight = 50
    assert pick(Picker(), replicas, "a1", can_load=False).replica is replicas[0]
    replicas[0].healthy = False
    assert pick(Picker(), replicas, "a1", can_load=False) is None


def test_prefix_affinity_keeps_a_conversation_on_its_replica_within_the_load_bound():
    replicas = _replicas(4)
    picker = Picker(rng=random.Random(2))
    picker.update(replicas)
    key = prefix_key(None, "s" * 100)
    homes = {id(pick(picker, replicas, prefix=key).replica) for _ in range(20)}
    assert len(homes) == 1
    home = next(r for r in replicas if id(r) in homes)
    assert pick(picker, replicas, prefix=key).scorer in ("prefix", "only")
    home.in_flight = 10  # far above the bound (1.25 x the mean): the key moves on
    assert pick(picker, replicas, prefix=key).replica is not home
    assert pick(picker, replicas, prefix=key, weights=Weights(prefix=0)).replica is not home


def test_one_hot_prefix_cannot_overload_its_replica():
    replicas = _replicas(8)
    picker = Picker(rng=random.Random(3))
    picker.update(replicas)
    key = prefix_key(None, "h" * 100)
    for _ in range(400):  # requests that never finish: the worst case for a hot prefix
        pick(picker, replicas, prefix=key).replica.in_flight += 1
    loads = sorted(r.in_flight for r in replicas)
    assert loads[-1] <= load_bound(399, 8) + 1, loads  # the bound holds
    assert loads[0] > 0  # everyone helps


def test_sampling_keeps_loads_even_at_many_replicas():
    replicas = _replicas(64)
    picker = Picker(rng=random.Random(4))
    picker.update(replicas)
    for _ in range(64 * 20):
        pick(picker, replicas).replica.in_flight += 1
    loads = [r.in_flight for r in replicas]
    assert max(loads) - min(loads) <= 6, sorted(loads)  # power of two choices: a small gap, not ~sqrt(n)


def test_exhaustive_finds_the_one_usable_replica_a_sample_misses():
    replicas = _replicas(64)
    for r in replicas[1:]:
        r.healthy = False
    picker = Picker(rng=random.Random(5))
    found = [pick(picker, replicas, exhaustive=True) for _ in range(5)]
    assert all(p is not None and p.replica is replicas[0] for p in found)


# --- unloading ------------------------------------------------------------------


def test_unload_victim_is_the_least_recently_used_idle_adapter_the_gateway_loaded():
    replica = Replica("http://r", healthy=True)
    replica.adapters = {"static", "old", "older", "busy", "recent"}
    replica.loaded_by_gateway = {"old": "/p", "older": "/p", "busy": "/p", "recent": "/p"}
    replica.adapter_used = {"old": 50.0, "older": 10.0, "busy": 0.0, "recent": 95.0, "static": 0.0}
    replica.adapter_in_flight = {"busy": 1}
    assert unload_victim(replica, "new", now=100.0, min_idle_s=30) == "older"
    replica.engine = EngineState(running=1, running_adapters=frozenset({"older"}), waiting_adapters=frozenset())
    assert unload_victim(replica, "new", now=100.0, min_idle_s=30) == "old"  # older runs on the engine
    assert unload_victim(replica, "new", now=60.0, min_idle_s=30) is None  # hysteresis: none idle long enough
    assert unload_victim(replica, "old", now=100.0, min_idle_s=30) is None  # never the one being loaded
