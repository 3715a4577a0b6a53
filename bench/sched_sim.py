"""Replica scheduling, simulated: N engines behind five pickers, the gateway's own picker among them.

A discrete-event simulation of vLLM engines (continuous batching) and of the gateway in front of
them. The engine model: each step decodes one token for every running request and prefills the
requests admitted in it; a step costs ``step_base + step_per_seq * batch + prefill_per_token *
uncached prompt tokens + swap_in * adapters swapped into a LoRA slot + cpu_load * adapters read
from disk``. Requests wait while the batch is full, the KV cache is full, or every LoRA slot is
held by adapters of running requests. The prefix cache is an LRU over prompt segments (system
prompt, each earlier turn) per adapter. Costs come from bench/results/sched_calibration.json
(measured on the real vLLM CPU engine by bench/sched_calibrate.py) where it has them; the rest
are assumed and marked so in the results.

Policies, each given the same engines and the same request stream:

  round_robin     the next replica in turn
  least_loaded    fewest requests in flight from the gateway
  holder_first    loragate before #27: replicas holding the adapter first, fewest in flight among them
  gie             the Gateway API Inference Extension's default scorers, re-implemented: queue, KV-cache
                  utilisation, LoRA affinity (1 active, 0.8 free slot, else 0) and prefix-cache (share
                  of the prompt's blocks in its own per-replica LRU index), weight 1 each, max score wins
  loragate        service/picker.py, imported: the gateway's own code, fed scrapes as the gateway is

Workloads: ``zipf`` (single-turn prompts, adapters by Zipf popularity), ``prefix`` (multi-turn chats
on shared system prompts), ``bursts`` (Zipf adapters, arrivals in bursts). For each, the offered load
rises step by step; the throughput at the SLO is the highest completed rate whose p99 TTFT stays
within the SLO. Results: bench/results/sched_sim.json and sched_sim.md.

Run: .venv/bin/python bench/sched_sim.py [--quick]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loragate.service.enginestate import EngineState  # noqa: E402
from loragate.service.picker import Picker  # noqa: E402
from loragate.service.prefixring import prefix_key, prompt_prefix  # noqa: E402
from loragate.service.replicas import Replica  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SCAN_LIMIT = 128  # waiting requests an engine step skips at most (their adapter has no LoRA slot), and reports


# --- the engine model -------------------------------------------------------------------------------


@dataclass
class Costs:
    step_base_s: float = 0.004  # decode step, batch of 1
    step_per_seq_s: float = 0.0003  # each further sequence in the batch
    prefill_per_token_s: float = 0.00002
    swap_in_s: float = 0.005  # an adapter into a LoRA slot (host memory -> accelerator)
    cpu_load_s: float = 0.03  # an adapter read from disk (not in the host LoRA cache)
    gateway_load_s: float = 0.05  # /v1/load_lora_adapter round trip
    max_loras: int = 4  # LoRA slots (--max-loras)
    max_cpu_loras: int = 8  # host LoRA cache (--max-cpu-loras); assumed 2x slots
    max_seqs: int = 64  # batch limit (--max-num-seqs); assumed
    kv_tokens: int = 65536  # KV-cache capacity in tokens; assumed
    prefix_cache_tokens: int = 49152  # of it, what the prefix cache keeps of finished requests; assumed
    batch_tokens: int = 4096  # prefill tokens per step (--max-num-batched-tokens); assumed
    measured: list[str] = field(default_factory=list)

    @classmethod
    def calibrated(cls, path: Path) -> "Costs":
        costs = cls()
        if not path.exists():
            return costs
        cal = json.loads(path.read_text())
        steps = {int(k): v for k, v in cal["decode_step_s"].items()}
        if 1 in steps and 16 in steps and steps[16] > steps[1]:
            costs.step_per_seq_s = (steps[16] - steps[1]) / 15
            costs.step_base_s = steps[1] - costs.step_per_seq_s
            costs.measured += ["step_base_s", "step_per_seq_s"]
        if cal["prefill"]["s_per_token"] > 0:
            costs.prefill_per_token_s = cal["prefill"]["s_per_token"]
            costs.measured.append("prefill_per_token_s")
        if cal["lora"]["swap_in_s"] > 0:
            costs.swap_in_s = cal["lora"]["swap_in_s"]
            costs.measured.append("swap_in_s")
        costs.gateway_load_s = cal["lora_load_s"]
        costs.measured.append("gateway_load_s")
        return costs


@dataclass(eq=False)
class Request:
    arrival: float
    adapter: str | None
    segments: list[tuple[tuple, int]]  # (segment key, tokens): system prompt, earlier turns, this turn
    output: int
    prefix: int | None  # the gateway's prefix key (service/prefixring.py)
    conversation: "Conversation | None" = None
    first_token: float | None = None
    done: float | None = None
    engine: "Engine | None" = None
    kv: int = 0

    @property
    def prompt(self) -> int:
        return sum(tokens for _, tokens in self.segments)


class Sim:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()

    def at(self, when: float, action, *args) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action, args))

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            self.now, _, action, args = heapq.heappop(self._events)
            action(*args)
        self.now = until


class Engine:
    def __init__(self, index: int, sim: Sim, costs: Costs, gateway: "Gateway") -> None:
        self.url = f"http://10.0.{index // 250}.{index % 250}:8000"
        self.sim, self.costs, self.gateway = sim, costs, gateway
        self.waiting: deque[Request] = deque()
        self.running: list[tuple[int, int, Request]] = []  # heap of (finish step, seq, request)
        self.running_adapters: dict[str, int] = {}
        self.steps = 0
        self.busy = False
        self.kv_used = 0
        self.slots: OrderedDict[str, None] = OrderedDict()  # adapters in LoRA slots, LRU first
        self.host: OrderedDict[str, None] = OrderedDict()  # adapters in host memory, LRU first
        self.cache: OrderedDict[tuple, int] = OrderedDict()  # prefix segments (adapter, key) -> tokens
        self.cache_tokens = 0
        self.registered: set[str] = set()
        self._prefilling: list[Request] = []
        self._seq = itertools.count()

    def state(self) -> EngineState:
        waiting_adapters = frozenset(r.adapter for r in itertools.islice(self.waiting, SCAN_LIMIT) if r.adapter)
        return EngineState(
            running=float(len(self.running)),
            waiting=float(len(self.waiting)),
            kv_usage=self.kv_used / self.costs.kv_tokens,
            max_lora=self.costs.max_loras,
            running_adapters=frozenset(self.running_adapters),
            waiting_adapters=waiting_adapters,
        )

    def submit(self, request: Request) -> None:
        self.waiting.append(request)
        if not self.busy:
            self._step()

    def _hit(self, request: Request) -> int:
        hit = 0
        for key, tokens in request.segments[:-1]:
            if (request.adapter, key) not in self.cache:
                break
            hit += tokens
        return hit

    def _remember(self, request: Request) -> None:
        for key, tokens in request.segments:
            entry = (request.adapter, key)
            if entry in self.cache:
                self.cache.move_to_end(entry)
                continue
            self.cache[entry] = tokens
            self.cache_tokens += tokens
        while self.cache_tokens > self.costs.prefix_cache_tokens and self.cache:
            _, tokens = self.cache.popitem(last=False)
            self.cache_tokens -= tokens

    def _step(self) -> None:
        costs = self.costs
        prefill = swaps = reads = 0
        budget = costs.batch_tokens
        skipped: list[Request] = []  # their adapter finds no free LoRA slot: they wait, the next go on
        while self.waiting and len(skipped) < SCAN_LIMIT:
            if len(self.running) >= costs.max_seqs or budget <= 0:
                break
            request = self.waiting[0]
            uncached = request.prompt - self._hit(request)
            need = uncached + request.output  # cached prefix blocks are shared, not copied
            if self.kv_used + need > costs.kv_tokens:
                break
            self.waiting.popleft()
            adapter = request.adapter
            if adapter is not None and adapter not in self.slots:
                if len(self.slots) >= costs.max_loras:
                    free = next((a for a in self.slots if a not in self.running_adapters), None)
                    if free is None:
                        skipped.append(request)
                        continue
                    del self.slots[free]
                self.slots[adapter] = None
                swaps += 1
                if adapter in self.host:
                    self.host.move_to_end(adapter)
                else:
                    reads += 1
                    self.host[adapter] = None
                    if len(self.host) > costs.max_cpu_loras:
                        self.host.popitem(last=False)
            elif adapter is not None:
                self.slots.move_to_end(adapter)
            request.kv = need
            prefill += uncached
            budget -= uncached
            self.kv_used += need
            heapq.heappush(self.running, (self.steps + request.output, next(self._seq), request))
            if adapter is not None:
                self.running_adapters[adapter] = self.running_adapters.get(adapter, 0) + 1
            self._prefilling.append(request)
        self.waiting.extendleft(reversed(skipped))
        if not self.running:
            self.busy = False
            return
        self.busy = True
        duration = (
            costs.step_base_s
            + costs.step_per_seq_s * len(self.running)
            + costs.prefill_per_token_s * prefill
            + costs.swap_in_s * swaps
            + costs.cpu_load_s * reads
        )
        self.sim.at(self.sim.now + duration, self._end_step)

    def _end_step(self) -> None:
        now = self.sim.now
        self.steps += 1
        for request in self._prefilling:
            request.first_token = now
            self._remember(request)
        self._prefilling = []
        while self.running and self.running[0][0] <= self.steps:
            _, _, request = heapq.heappop(self.running)
            request.done = now
            self.kv_used -= request.kv
            if request.adapter is not None:
                _count_down(self.running_adapters, request.adapter)
            self.gateway.finished(request)
        self._step()


# --- the gateway and its policies ----------------------------------------------------------------------


class Gateway:
    """Dispatches each request to an engine by ``policy``; loads adapters on demand; scrapes engines."""

    def __init__(self, sim: Sim, costs: Costs, n: int, policy: str, scrape_s: float, rng: random.Random) -> None:
        self.sim, self.costs, self.policy, self.scrape_s, self.rng = sim, costs, policy, scrape_s, rng
        self.engines = [Engine(i, sim, costs, self) for i in range(n)]
        self.replicas = [Replica(e.url, healthy=True) for e in self.engines]
        for replica, engine in zip(self.replicas, self.engines):
            replica.adapters = engine.registered  # what the gateway knows: it loads them itself
        self.by_replica = {id(r): e for r, e in zip(self.replicas, self.engines)}
        self.index = {id(e): i for i, e in enumerate(self.engines)}
        self.loads_under_way: dict[str, int] = {}
        self.holders: dict[str, list[Replica]] = {}  # the replica set's index (service/replicas.py)
        self.total_in_flight = 0
        self.rr = 0
        self.picker = Picker(rng=random.Random(rng.random()))
        self.picker.update(self.replicas)
        self.gie_index: list[OrderedDict] = [OrderedDict() for _ in self.engines]  # block keys per replica
        self.completed: list[Request] = []
        self.on_done = None
        self.sim.at(0.0, self._scrape)

    def _scrape(self) -> None:
        for replica, engine in zip(self.replicas, self.engines):
            replica.engine = engine.state()
            replica.engine_in_flight = replica.in_flight
        self.sim.at(self.sim.now + self.scrape_s, self._scrape)

    # policies: each returns the index of an engine
    def _round_robin(self, request: Request) -> int:
        self.rr = (self.rr + 1) % len(self.engines)
        return self.rr

    def _least_loaded(self, request: Request) -> int:
        return min(range(len(self.replicas)), key=lambda i: (self.replicas[i].in_flight, self.rng.random()))

    def _holder_first(self, request: Request) -> int:
        replicas = self.replicas
        holders = [i for i, r in enumerate(replicas) if request.adapter is None or r.holds(request.adapter)]
        pool = holders or list(range(len(replicas)))
        return min(pool, key=lambda i: replicas[i].in_flight)

    def _gie(self, request: Request) -> int:
        """The inference extension's default profile: four scorers in [0, 1], weight 1 each, max wins."""
        replicas = self.replicas
        queues = [(r.engine.waiting or 0.0) if r.engine else 0.0 for r in replicas]
        low, high = min(queues), max(queues)
        blocks = _blocks(request)
        best, best_score = 0, -1.0
        for i, r in enumerate(replicas):
            engine = r.engine
            queue = 1.0 if high == low else (high - queues[i]) / (high - low)
            kv = 1.0 - (engine.kv_usage or 0.0 if engine else 0.0)
            if request.adapter is None:
                lora = 1.0
            elif engine is not None and request.adapter in engine.active_adapters:
                lora = 1.0
            elif engine is None or len(engine.active_adapters) < (engine.max_lora or 0):
                lora = 0.8
            else:
                lora = 0.0
            index = self.gie_index[i]
            matched = 0
            for block in blocks:
                if block not in index:
                    break
                matched += 1
            prefix = matched / len(blocks) if blocks else 0.0
            score = queue + kv + lora + prefix + self.rng.random() * 1e-9
            if score > best_score:
                best, best_score = i, score
        index = self.gie_index[best]
        for block in blocks:
            index[block] = None
            index.move_to_end(block)
        while len(index) > 31250:  # lruCapacityPerServer
            index.popitem(last=False)
        return best

    def _loragate(self, request: Request) -> int:
        adapter = request.adapter
        limit = 1 << 30
        pick = self.picker.pick(
            self.replicas,
            lambda r: r.in_flight < limit,
            adapter=adapter,
            can_load=lambda r: True,
            prefix=request.prefix,
            holders=self.holders.get(adapter, ()) if adapter else (),
            loading_elsewhere=adapter is not None and adapter in self.loads_under_way,
            total_in_flight=self.total_in_flight,
        )
        assert pick is not None
        return self.index[id(self.by_replica[id(pick.replica)])]

    def dispatch(self, request: Request) -> None:
        i = getattr(self, f"_{self.policy}")(request)
        replica, engine = self.replicas[i], self.engines[i]
        replica.in_flight += 1
        self.total_in_flight += 1
        request.engine = engine
        adapter = request.adapter
        if adapter is not None:
            replica.adapter_in_flight[adapter] = replica.adapter_in_flight.get(adapter, 0) + 1
        if adapter is None or adapter in engine.registered:
            engine.submit(request)
            return
        waiters = replica.loading.get(adapter)
        if waiters is None:  # one load, shared by the requests that arrive while it runs
            waiters = replica.loading[adapter] = []  # type: ignore[assignment]
            self.holders.setdefault(adapter, []).append(replica)
            self.loads_under_way[adapter] = self.loads_under_way.get(adapter, 0) + 1
            self.sim.at(self.sim.now + self.costs.gateway_load_s, self._loaded, replica, engine, adapter)
        waiters.append(request)  # type: ignore[attr-defined]

    def _loaded(self, replica: Replica, engine: Engine, adapter: str) -> None:
        engine.registered.add(adapter)
        waiters = replica.loading.pop(adapter)
        _count_down(self.loads_under_way, adapter)
        for request in waiters:  # type: ignore[attr-defined]
            engine.submit(request)

    def finished(self, request: Request) -> None:
        replica = self.replicas[self.index[id(request.engine)]]
        replica.in_flight -= 1
        self.total_in_flight -= 1
        if request.adapter is not None:
            _count_down(replica.adapter_in_flight, request.adapter)
        self.completed.append(request)
        if self.on_done is not None:
            self.on_done(request)


def _count_down(counts: dict[str, int], key: str) -> None:
    """One fewer of ``key``; none left: the key goes (membership means "some")."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def _blocks(request: Request) -> list[tuple]:
    """The GIE prefix scorer hashes the prompt in blocks; here a segment of n tokens is n/64 blocks."""
    blocks: list[tuple] = []
    for key, tokens in request.segments:
        blocks.extend((request.adapter, key, b) for b in range(max(1, tokens // 64)))
    return blocks


# --- workloads ----------------------------------------------------------------------------------------


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1 / (k**s) for k in range(1, n + 1)]


@dataclass(eq=False)
class Conversation:
    adapter: str | None
    system: int
    turns_left: int
    history: list[tuple[tuple, int]]
    first_text: str


class Workload:
    """A stream of requests at ``rate`` per second (multi-turn chats: conversations start at rate / turns)."""

    def __init__(self, kind: str, rate: float, rng: random.Random, adapters: int) -> None:
        self.kind, self.rate, self.rng, self.adapters = kind, rate, rng, adapters
        self.names = [f"adapter-{i}" for i in range(adapters)]
        self.weights = list(itertools.accumulate(zipf_weights(adapters)))
        # Prefix-heavy: 32 long system prompts (agent instructions, a RAG context), popularity by Zipf; more
        # than one engine's prefix cache holds, so where a prompt's conversations land decides the hits.
        self.system_texts = [f"You are assistant number {i} of ACME. Follow the house rules. " * 8 for i in range(32)]
        self.system_tokens = [rng.randint(2000, 4000) for _ in self.system_texts]
        self.system_weights = list(itertools.accumulate(zipf_weights(len(self.system_texts), 0.8)))
        self.mean_turns = 4

    def adapter(self) -> str:
        return self.rng.choices(self.names, cum_weights=self.weights)[0]

    def start(self, sim: Sim, gateway: Gateway, until: float) -> None:
        gateway.on_done = lambda r: self._next_turn(sim, gateway, r, until)
        self._arrive(sim, gateway, until)

    def _interval(self, sim: Sim) -> float:
        rate = self.rate / (self.mean_turns if self.kind == "prefix" else 1)
        if self.kind != "bursts":
            return self.rng.expovariate(rate)
        # Bursts: 1 s at 4x the mean rate, then 3 s of nothing (the same mean).
        gap = self.rng.expovariate(rate * 4)
        phase = (sim.now + gap) % 4.0
        return gap if phase < 1.0 else gap + 4.0 - phase

    def _arrive(self, sim: Sim, gateway: Gateway, until: float) -> None:
        if sim.now >= until:
            return
        if self.kind == "prefix":
            system = self.rng.choices(range(len(self.system_texts)), cum_weights=self.system_weights)[0]
            first = f"conversation {self.rng.random():.12f}: my question is about the order I placed last week"
            conversation = Conversation(
                self.names[system % self.adapters], system, self.rng.randint(2, 2 * self.mean_turns - 2), [], first
            )
            self._turn(sim, gateway, conversation)
        else:
            text = f"a question {self.rng.random():.12f} that shares nothing with the others, long enough"
            prompt = self.rng.randint(200, 600)
            request = Request(
                sim.now, self.adapter(), [(("unique", text), prompt)], self.rng.randint(32, 128), prefix_key(None, text)
            )
            request.prefix = None  # nothing shared: no prefix key (too short a common beginning)
            gateway.dispatch(request)
        sim.at(sim.now + self._interval(sim), self._arrive, sim, gateway, until)

    def _turn(self, sim: Sim, gateway: Gateway, conversation: Conversation) -> None:
        user = self.rng.randint(40, 160)
        turn = (("turn", id(conversation), len(conversation.history)), user)
        segments = [
            (("system", conversation.system), self.system_tokens[conversation.system]),
            *conversation.history,
            turn,
        ]
        payload = {
            "messages": [
                {"role": "system", "content": self.system_texts[conversation.system]},
                {"role": "user", "content": conversation.first_text},
            ]
        }
        text = prompt_prefix(payload)
        request = Request(
            sim.now,
            conversation.adapter,
            segments,
            self.rng.randint(40, 160),
            prefix_key(conversation.adapter, text) if text else None,
            conversation,
        )
        conversation.history.append(turn)
        conversation.turns_left -= 1
        gateway.dispatch(request)

    def _next_turn(self, sim: Sim, gateway: Gateway, request: Request, until: float) -> None:
        conversation = request.conversation
        if conversation is None or conversation.turns_left <= 0 or sim.now >= until:
            return
        conversation.history.append((("answer", id(conversation), len(conversation.history)), request.output))
        sim.at(sim.now + self.rng.expovariate(1 / 1.0), self._turn, sim, gateway, conversation)


# --- one run, and the sweep ------------------------------------------------------------------------------


def run(
    kind: str,
    policy: str,
    n: int,
    rate: float,
    costs: Costs,
    *,
    seconds: float,
    adapters: int,
    scrape_s: float,
    seed: int,
) -> dict:
    sim = Sim()
    gateway = Gateway(sim, costs, n, policy, scrape_s, random.Random(seed))
    workload = Workload(kind, rate, random.Random(seed + 1), adapters)
    workload.start(sim, gateway, seconds)
    sim.run(seconds * 1.5)
    warm = seconds * 0.2
    done = [r for r in gateway.completed if r.arrival >= warm and r.arrival < seconds]
    started = [r for r in itertools.chain(gateway.completed) if r.arrival >= warm]
    # Requests still unanswered at the end count with the TTFT they have so far (never dropped as "fast").
    pending = sum(1 for e in gateway.engines for _, _, r in e.running if r.first_token is None and r.arrival >= warm)
    pending += sum(1 for e in gateway.engines for r in e.waiting if r.arrival >= warm)
    ttfts = sorted([r.first_token - r.arrival for r in done if r.first_token is not None] + [sim.now - warm] * pending)
    if not ttfts:
        return {"rate": rate, "throughput": 0.0, "p50": math.inf, "p99": math.inf}
    return {
        "rate": rate,
        "throughput": len(done) / (seconds - warm),
        "completed": len(started),
        "p50": ttfts[len(ttfts) // 2],
        "p99": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
    }


def sweep(kind: str, policy: str, n: int, rates: list[float], slo_s: float, costs: Costs, **kw) -> dict:
    points = []
    for rate in rates:
        point = run(kind, policy, n, rate, costs, **kw)
        points.append(point)
        if point["p99"] > slo_s * 3:  # far past the SLO: higher loads only get worse
            break
    within = [p for p in points if p["p99"] <= slo_s]
    best = max(within, key=lambda p: p["throughput"]) if within else None
    return {
        "points": points,
        "throughput_at_slo": best["throughput"] if best else 0.0,
        "rate_at_slo": best["rate"] if best else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer loads, shorter runs")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    costs = Costs.calibrated(RESULTS / "sched_calibration.json")
    seconds = 8.0 if args.quick else args.seconds
    scrape_s = 0.1
    policies = ["round_robin", "least_loaded", "holder_first", "gie", "loragate"]
    slo_s = 0.5
    cases = [
        ("prefix", 16, 8),
        ("zipf", 16, 64),
        ("zipf", 16, 512),
        ("bursts", 16, 256),
        ("zipf", 4, 8),
        ("prefix", 64, 8),
    ]
    if args.quick:
        cases = [("prefix", 4, 8), ("zipf", 4, 64)]
    # Offered load, requests/s per engine: rising by 40% each step until p99 TTFT is 3x past the SLO.
    ladder = [2 * 1.4**k for k in range(12)] if not args.quick else [4, 8, 16, 32]
    started = time.perf_counter()
    results = []
    for kind, n, adapters in cases:
        row = {"workload": kind, "engines": n, "adapters": adapters, "policies": {}}
        rates = [per_engine * n for per_engine in ladder]
        for policy in policies:
            row["policies"][policy] = sweep(
                kind, policy, n, rates, slo_s, costs, seconds=seconds, adapters=adapters, scrape_s=scrape_s, seed=11
            )
        rr = row["policies"]["round_robin"]["throughput_at_slo"]
        for policy, result in row["policies"].items():
            result["vs_round_robin"] = result["throughput_at_slo"] / rr if rr else None
            # p50/p99 at the highest load every policy met the SLO at (or the lowest load)
        common = min((r["rate_at_slo"] for r in row["policies"].values() if r["rate_at_slo"]), default=rates[0])
        for result in row["policies"].values():
            at = [p for p in result["points"] if abs(p["rate"] - common) < 1e-9] or result["points"][:1]
            result["p50_at_common_s"], result["p99_at_common_s"] = at[0]["p50"], at[0]["p99"]
        row["common_rate"] = common
        results.append(row)
        print(
            f"{kind:7} n={n:<3} adapters={adapters:<4} "
            + "  ".join(
                f"{p}={r['throughput_at_slo']:.0f}/s ({_ratio(r['vs_round_robin'])})"
                for p, r in row["policies"].items()
            ),
            flush=True,
        )
    elapsed = time.perf_counter() - started
    measured = set(costs.measured)
    out = {
        "slo": {"ttft_p99_s": slo_s},
        "seconds_simulated_per_point": seconds,
        "scrape_interval_s": scrape_s,
        "engine_model": {k: v for k, v in vars(costs).items() if k != "measured"},
        "measured": sorted(measured),
        "assumed": sorted(k for k in vars(costs) if k != "measured" and k not in measured),
        "results": results,
        "runtime_s": round(elapsed, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    name = "sched_sim_quick" if args.quick else "sched_sim"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2, default=lambda x: None))
    (RESULTS / f"{name}.md").write_text(markdown(out))
    print(markdown(out))
    print(f"runtime {elapsed:.0f} s")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(out: dict) -> str:
    lines = [
        f"Throughput (completed requests/s) at p99 TTFT <= {out['slo']['ttft_p99_s']} s, ratio to round-robin; "
        "p50 / p99 TTFT (ms) at the highest load all policies met the SLO at. Simulated "
        f"({out['seconds_simulated_per_point']:g} s per point); engine costs measured: "
        f"{', '.join(out['measured']) or 'none'}; assumed: {', '.join(out['assumed'])}.",
        "",
    ]
    policies = list(out["results"][0]["policies"])
    lines.append("| workload | engines | adapters | " + " | ".join(policies) + " |")
    lines.append("|---|---|---|" + "---|" * len(policies))
    for row in out["results"]:
        cells = []
        for p in policies:
            r = row["policies"][p]
            cells.append(
                f"{r['throughput_at_slo']:.0f} ({_ratio(r['vs_round_robin'])}); "
                f"{r['p50_at_common_s'] * 1000:.0f} / {r['p99_at_common_s'] * 1000:.0f}"
            )
        lines.append(f"| {row['workload']} | {row['engines']} | {row['adapters']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
