"""Shadow traffic in-process (service/shadow.py): the served app with the replicas' call scripted.

The client's answer must never change, slow down or fail because of a shadow; shadows are
sampled, bounded, dropped when the gateway is loaded, cancelled past their deadline, never
charged to the key and counted only in their own series.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from loragate.common.catalog import CatalogError, CatalogFile
from loragate.service.app import create_app
from loragate.service.auth import Principal
from loragate.service.requestlog.rows import request_row
from loragate.service.metrics import Metrics
from loragate.service.settings import Settings
from tests.unit.test_gateway_core import Call, Scripted, answer, sample, stream, stream_events

ONE_REPLICA = ["http://10.0.0.1:8000"]
ROUTES = """
routes:
  chat:
    variants:
      - {{name: v1, adapter: a1, path: /a/a1, weight: 1}}
      - {{name: v2, adapter: a2, path: /a/a2, weight: 0}}
    shadow: {{variant: v2, percent: {percent}, max_in_flight: {max_in_flight}, deadline_s: {deadline_s}}}
"""
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


class Charges:
    """An authenticator whose one principal records what it is charged."""

    def __init__(self) -> None:
        self.charged: list[int] = []
        outer = self

        class Recording(Principal):
            def charge(self, tokens: int, cost_usd: float = 0.0) -> None:
                outer.charged.append(tokens)

        self.principal = Recording()

    def authenticate(self, headers) -> Principal:
        return self.principal


class ListLog:
    def __init__(self) -> None:
        self.records = []

    def record(self, record) -> None:
        self.records.append(record)


@pytest.fixture
def build(tmp_path):
    built = []

    def make(answer_of, *, percent=100, max_in_flight=8, deadline_s=30, replicas=ONE_REPLICA, **settings):
        routes = tmp_path / "routes.yaml"
        routes.write_text(ROUTES.format(percent=percent, max_in_flight=max_in_flight, deadline_s=deadline_s))
        metrics = Metrics()
        upstream = Scripted(answer_of)
        app = create_app(Settings(routes_file=routes, upstreams=replicas, **settings), metrics, upstream=upstream)
        gateway = app.state.gateway
        gateway.shadows.rng = random.Random(7)
        log = ListLog()
        gateway.accounting.request_log = gateway.shadows.request_log = log
        for replica in app.state.pool.replicas:
            replica.healthy = True
            replica.adapters = {"a1", "a2"}
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        built.append(app)
        return client, metrics, upstream, gateway, log

    yield make
    for app in built:  # nothing leaked: every replica slot given back
        assert all(r.in_flight == 0 for r in app.state.pool.replicas)


async def settle(gateway, timeout_s: float = 2.0) -> None:
    """Wait for the background shadows to end."""
    async with asyncio.timeout(timeout_s):
        while gateway.shadows._tasks:
            await asyncio.sleep(0.005)


def by_adapter(texts: dict[str, str]):
    def answer_of(call: Call):
        text = texts[call.model]
        if call.payload.get("stream"):
            return stream(f"id-{call.model}", [text], (3, 1))
        return answer(text, completion=len(text.split()))

    return answer_of


async def test_primary_answer_unchanged_shadow_logged_paired_never_charged_and_counted_apart(build):
    client, metrics, upstream, gateway, log = build(by_adapter({"a1": "primary answer", "a2": "shadow says other"}))
    charges = Charges()
    gateway.auth = charges
    plain = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "r" * 32})
    streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await settle(gateway)

    assert plain.status_code == 200 and plain.headers["x-loragate-variant"] == "v1"
    assert plain.content == answer("primary answer", completion=2).parts[0]  # byte for byte
    texts = [
        e["choices"][0]["delta"].get("content")
        for e in stream_events(streamed.text)
        if isinstance(e, dict) and e.get("choices")
    ]
    assert "".join(t for t in texts if t) == "primary answer"
    # The shadow copies: the shadow's adapter, never streamed, no stream_options, their own upstream id.
    shadow_calls = [c for c in upstream.calls if c.model == "a2"]
    assert len(shadow_calls) == 2 and all(
        "stream" not in c.payload and "stream_options" not in c.payload for c in shadow_calls
    )
    # Charged once per request (the primaries' tokens), never for the shadows.
    assert charges.charged == [3 + 2, 3 + 1]
    # Client-facing series know nothing of v2; its own series have both.
    assert sample(metrics, "loragate_requests_total", route="chat", variant="v2", status_class="2xx") == 0
    assert sample(metrics, "loragate_requests_total", route="chat", variant="v1", status_class="2xx") == 2
    assert sample(metrics, "loragate_completion_tokens_total", route="chat", variant="v2") == 0
    assert sample(metrics, "loragate_shadow_requests_total", route="chat", variant="v2", status_class="2xx") == 2
    assert sample(metrics, "loragate_shadow_completion_tokens_total", route="chat", variant="v2") == 6
    assert sample(metrics, "loragate_shadow_request_duration_seconds_count", route="chat", variant="v2") == 2
    assert sample(metrics, "loragate_shadow_requests_in_flight", route="chat") == 0
    # The log: each shadow row under its primary's request id, role shadow, its own answer.
    rows = [request_row(r, "full") for r in log.records]
    assert sorted((r["role"], r["variant"]) for r in rows) == [("primary", "v1")] * 2 + [("shadow", "v2")] * 2
    first = [r for r in rows if r["request_id"] == "r" * 32]
    assert {r["role"]: r["response_text"] for r in first} == {
        "primary": "primary answer",
        "shadow": "shadow says other",
    }


async def test_sampled_share_follows_percent(build):
    client, metrics, upstream, gateway, _log = build(by_adapter({"a1": "a", "a2": "b"}), percent=25)
    for _ in range(200):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await asyncio.sleep(0)  # the scripted upstream never suspends: let the loop run the shadows, as a server's does
    await settle(gateway)
    shadows = sum(1 for c in upstream.calls if c.model == "a2")
    assert 30 <= shadows <= 70  # binomial(200, 0.25): mean 50, sd 6.1
    assert sample(metrics, "loragate_shadow_requests_total", route="chat", variant="v2", status_class="2xx") == shadows


async def test_max_in_flight_drops_and_deadline_cancels_without_touching_the_primary(build):
    release = asyncio.Event()

    async def slow_shadow(call: Call):
        if call.model == "a2":
            await release.wait()  # never set: the deadline cancels it
        return answer("ok")

    client, metrics, upstream, gateway, log = build(
        slow_shadow, max_in_flight=2, deadline_s=0.2, max_in_flight_per_upstream=64
    )
    answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(5)))
    assert [a.status_code for a in answers] == [200] * 5  # the primaries did not wait for their shadows
    assert sum(1 for c in upstream.calls if c.model == "a2") == 2
    assert sample(metrics, "loragate_shadow_dropped_total", route="chat", variant="v2", reason="max_in_flight") == 3
    await settle(gateway)
    assert sample(metrics, "loragate_shadow_dropped_total", route="chat", variant="v2", reason="deadline") == 2
    assert sample(metrics, "loragate_shadow_requests_total", route="chat", variant="v2", status_class="2xx") == 0
    assert all(r.role == "primary" for r in log.records) and len(log.records) == 5  # no row for a cancelled shadow


async def test_shadow_dropped_when_the_replicas_are_loaded_and_primary_served(build):
    release = asyncio.Event()

    async def answer_of(call: Call):
        if call.payload["messages"][0]["content"] == "hold":
            await release.wait()
        return answer("ok")

    # One replica, 3 slots: two held primaries take 2; a quick request takes the last one and is
    # answered, but its shadow (sent after it) finds one free slot only, and a shadow never takes the last.
    client, metrics, upstream, gateway, _log = build(answer_of, max_in_flight_per_upstream=3)
    hold = {**CHAT, "messages": [{"role": "user", "content": "hold"}]}
    held = [asyncio.create_task(client.post("/v1/chat/completions", json=hold)) for _ in range(2)]
    await asyncio.sleep(0.05)
    quick = await client.post("/v1/chat/completions", json=CHAT)
    assert quick.status_code == 200
    await asyncio.sleep(0.05)
    assert sample(metrics, "loragate_shadow_dropped_total", route="chat", variant="v2", reason="overloaded") == 1
    # Requests waiting for room (admission): a shadow never queues beside them.
    waiting = [asyncio.create_task(client.post("/v1/chat/completions", json=hold)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert gateway.pool.admission.waiting == 1
    release.set()
    assert [r.status_code for r in await asyncio.gather(*held, *waiting)] == [200] * 4
    await settle(gateway)
    assert (
        sum(1 for c in upstream.calls if c.model == "a2")
        + sample(metrics, "loragate_shadow_dropped_total", route="chat", variant="v2", reason="overloaded")
        == 5
    )
    assert sample(metrics, "loragate_shadow_requests_total", route="chat", variant="v2", status_class="2xx") == sum(
        1 for c in upstream.calls if c.model == "a2"
    )


async def test_shadow_is_sent_only_after_its_primary_answered(build):
    order = []

    async def answer_of(call: Call):
        order.append(call.model)
        await asyncio.sleep(0.02)
        order.append(f"{call.model} done")
        return answer("ok")

    client, _metrics, _upstream, gateway, _log = build(answer_of)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    await settle(gateway)
    assert order == ["a1", "a1 done", "a2", "a2 done"]  # never in the engine beside its own primary


async def test_failing_shadow_never_fails_the_primary_nor_feeds_its_circuits(build):
    from loragate.service.failures import FailureReason, UpstreamFailure

    def answer_of(call: Call):
        if call.model == "a2":
            raise UpstreamFailure(FailureReason.UPSTREAM_5XX, "scripted 500")
        return answer("fine")

    client, metrics, upstream, gateway, log = build(answer_of, circuit_failures=2)
    for _ in range(6):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await asyncio.sleep(0)
    await settle(gateway)
    assert sample(metrics, "loragate_shadow_requests_total", route="chat", variant="v2", status_class="5xx") == 6
    assert all(r.circuits.get("a2") is None or r.circuits["a2"].state == 0 for r in gateway.pool.replicas)
    assert sum(1 for c in upstream.calls if c.model == "a2") == 6  # no retries, no fallback for shadows
    assert sample(metrics, "loragate_fallbacks_total", route="chat", variant="v1", reason="upstream_5xx") == 0


async def test_shadow_skipped_when_the_request_is_pinned_to_it(build):
    client, metrics, upstream, gateway, _log = build(by_adapter({"a1": "a", "a2": "b"}))
    assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "chat:v2"})).status_code == 200
    await settle(gateway)
    assert [c.model for c in upstream.calls] == ["a2"]
    assert sample(metrics, "loragate_shadow_dropped_total", route="chat", variant="v2", reason="same_variant") == 1


GOOD = """
routes:
  chat:
    variants:
      - {name: v1, adapter: a1, weight: 90}
      - {name: v2, adapter: a2, weight: 10}
      - {name: v3, adapter: a3, weight: 0}
    shadow: {variant: v3, percent: 10, max_in_flight: 8}
"""


@pytest.mark.parametrize(
    "shadow, field, words",
    [
        ("{variant: v9, percent: 10}", "shadow.variant", "unknown variant 'v9'"),
        ("{variant: v3, percent: 101}", "shadow.percent", "less than or equal to 100"),
        ("{variant: v3, percent: -5}", "shadow.percent", "greater than or equal to 0"),
        ("{variant: v1, percent: 10}", "shadow.variant", "'v1' is the route's primary variant"),
        ("{variant: v3, max_in_flight: 0}", "shadow.max_in_flight", "greater than or equal to 1"),
    ],
)
def test_bad_shadow_refused_naming_the_field_last_good_catalog_kept(tmp_path, shadow, field, words):
    path = tmp_path / "routes.yaml"
    path.write_text(GOOD)
    catalog = CatalogFile(path)
    assert catalog.current.routes["chat"].shadow.variant == "v3"
    path.write_text(GOOD.replace("{variant: v3, percent: 10, max_in_flight: 8}", shadow) + "\n")
    with pytest.raises(CatalogError) as error:
        catalog.reload_if_changed()
    assert field in str(error.value) and words in str(error.value)
    assert catalog.current.routes["chat"].shadow.variant == "v3"  # still serving the last good one


def test_shadow_of_the_only_weighted_variant_refused(tmp_path):
    from loragate.common.catalog import parse_catalog

    with pytest.raises(CatalogError, match=r"shadow\.variant: 'v1' is the route's primary"):
        parse_catalog("routes:\n  r:\n    variants: [{name: v1, adapter: a1, weight: 1}]\n    shadow: {variant: v1}\n")


# --- the monitor's comparison (monitoring/shadow.py) and the gate before a canary ---------------


def log_frame(rows: list[dict]):
    import pandas as pd

    base = {
        "route": "chat",
        "endpoint": "chat/completions",
        "status": 200,
        "latency_s": 0.1,
        "completion_tokens": 4,
        "prompt_text": "user: q",
    }
    frame = pd.DataFrame([{**base, **row} for row in rows])
    frame["timestamp"] = pd.to_datetime(range(len(frame)), unit="s", utc=True)
    return frame


def test_comparison_pairs_by_request_id_against_the_noise_floor():
    from loragate.monitoring.shadow import compare, token_f1

    rows = []
    for i in range(10):
        prompt = f"user: question {i % 5}"  # each prompt twice: 5 repeat pairs for the floor
        rows.append(
            {
                "request_id": f"r{i}",
                "role": "primary",
                "variant": "v1",
                "prompt_text": prompt,
                "response_text": f"the answer to {i % 5} is yes",
            }
        )
        rows.append(
            {
                "request_id": f"r{i}",
                "role": "shadow",
                "variant": "v2",
                "prompt_text": prompt,
                "latency_s": 0.3,
                "completion_tokens": 2,
                "status": 500 if i == 0 else 200,
                "response_text": None if i == 0 else ("the answer to 1 is yes" if i == 1 else "no idea"),
            }
        )
    rows.append({"request_id": "lonely", "role": "shadow", "variant": "v2", "response_text": "x"})  # no primary
    got = compare(log_frame(rows), "chat", "v2")
    assert (got.primary, got.pairs, got.answered_pairs) == ("v1", 10, 9)
    assert got.shadow_error_rate == pytest.approx(0.1) and got.primary_error_rate == 0
    assert got.error_rate_delta == pytest.approx(0.1)
    assert got.latency_ratio == pytest.approx(3.0) and got.length_ratio == pytest.approx(0.5)
    assert got.identical_rate == pytest.approx(1 / 9)
    expected = (1 + 8 * token_f1("the answer to 2 is yes", "no idea")) / 9
    assert got.similarity == pytest.approx(expected)
    assert (got.noise_floor.pairs, got.noise_floor.similarity, got.noise_floor.identical_rate) == (5, 1.0, 1.0)
    assert got.below_floor is True


def test_gate_needs_pairs_then_judges_errors_latency_similarity():
    from loragate.monitoring.shadow import NoiseFloor, ShadowComparison, ShadowGate, gate

    def comparison(pairs, delta=0.0, latency=1.0, similarity=0.8):
        return ShadowComparison(
            "chat",
            "v2",
            "v1",
            pairs,
            pairs,
            0.01,
            0.01 + delta,
            delta,
            latency,
            1.0,
            similarity,
            0.1,
            NoiseFloor(0, None, None),
        )

    config = ShadowGate(min_pairs=50, max_error_rate_delta=0.02, max_latency_ratio=1.5, min_similarity=0.5)
    assert gate(comparison(49), config).decision == "insufficient_data"
    assert gate(comparison(50), config).decision == "pass"
    failed = gate(comparison(60, delta=0.05, latency=2.0, similarity=0.2), config)
    assert failed.decision == "fail"
    assert all(word in failed.explanation for word in ("error rate", "latency ratio 2.00", "similarity 0.200"))


async def test_rollout_waits_for_the_shadow_gate_before_its_first_step(tmp_path):
    from loragate.monitoring.rollout.config import RolloutsConfig
    from loragate.monitoring.rollout.controller import RolloutController
    from loragate.monitoring.shadow import GateResult

    routes = tmp_path / "routes.yaml"
    routes.write_text(GOOD)
    config = RolloutsConfig.model_validate(
        {
            "routes_file": str(routes),
            "state_file": str(tmp_path / "state.json"),
            "canaries": [
                {"route": "chat", "stable": "v1", "canary": "v3", "interval_s": 60, "shadow_gate": {"min_pairs": 10}}
            ],
        }
    )
    decisions = ["insufficient_data", "fail", "pass"]
    asked = []

    async def shadow_gate(spec):
        asked.append(spec.canary)
        return GateResult(decisions.pop(0), "scripted", None)

    controller = RolloutController(config, None, shadow_gate=shadow_gate)
    assert await controller.tick(now=1000) == [] and "insufficient_data" in controller.errors["chat"]
    assert await controller.tick(now=1030) == []  # retried once per interval, not every round
    assert await controller.tick(now=1061) == [] and "fail" in controller.errors["chat"]
    assert parse_weights(routes.read_text()) == {"v1": 90, "v2": 10, "v3": 0}  # not started
    started = await controller.tick(now=1122)
    assert [t.action for t in started] == ["step"] and asked == ["v3"] * 3
    assert parse_weights(routes.read_text()) == {"v1": 95, "v2": 10, "v3": 5}  # the first step, shadow still valid


def parse_weights(text: str) -> dict[str, float]:
    from loragate.common.catalog import parse_catalog

    return {v.name: v.weight for v in parse_catalog(text).routes["chat"].variants if v.name != "base"}


async def test_logged_pairs_read_back_and_reported_by_the_cli(build, tmp_path, capsys):
    """Through the real Parquet store: the role column round-trips; files without it read as primary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loragate.cli import main as cli
    from loragate.common.logschema import conform
    from loragate.service.requestlog import parquet_store

    texts = {"a1": "the answer is yes", "a2": "the answer is no"}
    client, _metrics, _upstream, gateway, log = build(by_adapter(texts))
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await asyncio.sleep(0)
    await settle(gateway)
    root = tmp_path / "requestlog"
    parquet_store(str(root)).write("requests", [request_row(r, "full") for r in log.records])

    assert (
        cli(["shadow", "report", "--request-log", str(root), "--json", "--min-pairs", "3", "--min-similarity", "0.5"])
        == 0
    )
    [report] = json.loads(capsys.readouterr().out)
    assert (report["route"], report["variant"], report["primary"], report["pairs"]) == ("chat", "v2", "v1", 3)
    assert report["similarity"] == pytest.approx(0.75) and report["identical_rate"] == 0
    assert report["noise_floor"]["pairs"] == 1 and report["below_floor"] is True
    assert report["gate"]["decision"] == "pass"
    assert cli(["shadow", "report", "--request-log", str(root), "--min-pairs", "4"]) == 1  # not enough pairs yet

    old = pa.table({"request_id": ["x"], "status": [200]})  # a file from before the column
    pq.write_table(old, tmp_path / "old.parquet")
    assert conform(pq.read_table(tmp_path / "old.parquet"), "requests")["role"].to_pylist() == ["primary"]
