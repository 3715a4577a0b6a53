"""Priority classes end to end: the served app (create_app, its lifespan, the real HTTP client) in front of a
STUB engine in this process (tests/stub_engine.py, not vLLM) that the gateway keeps saturated
(LORAGATE_MAX_IN_FLIGHT_PER_UPSTREAM=1, each answer 150 ms). Also the class a request gets from its header
and its API key (service/priority.py). The queue alone: tests/unit/test_admission.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from loragate.service.apikeys import KeysError, hash_key, parse_keys
from loragate.service.app import create_app
from loragate.service.auth import Authenticator
from loragate.service.apikeys import KeyStore
from loragate.service.metrics import Metrics
from loragate.service.priority import Priority, PriorityPolicy, key_policy
from loragate.service.settings import Settings
from tests.local_http import serve
from tests.stub_engine import make_app as stub_engine

ROUTES = "routes:\n  chat:\n    variants: [{name: base, weight: 1}]\n"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
KEYS = f"""
keys:
  - {{id: batch, sha256: "{hash_key("lg-batch")}", priority: sheddable}}
  - {{id: app, sha256: "{hash_key("lg-app")}"}}
  - {{id: ops, sha256: "{hash_key("lg-ops")}", priorities: [critical, standard, sheddable]}}
"""


@contextlib.asynccontextmanager
async def saturated_gateway(tmp_path: Path, **settings) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The app in front of one stub engine, at most one request in flight to it; yields (client, app)."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    engine = stub_engine(base_ms=150, per_request_ms=0, max_running=8, max_lora=1, metrics=False, adapters=[])
    async with serve(engine) as port:
        app = create_app(
            Settings(
                routes_file=routes, upstreams=[f"http://127.0.0.1:{port}"], max_in_flight_per_upstream=1, **settings
            ),
            Metrics(CollectorRegistry()),
        )
        try:
            async with app.app.router.lifespan_context(app.app):
                async with httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=10
                ) as client:
                    yield client, app
        finally:
            gc.unfreeze()  # the lifespan freezes what it found (a served process's start-up objects)


async def queue_in_order(
    client: httpx.AsyncClient, app, requests: list[tuple[str, dict]]
) -> tuple[list[asyncio.Task], list[str]]:
    """Sends a first request (it takes the only slot), then each of ``requests`` (name, headers) once the one
    before it is waiting; returns the tasks and the list the names are appended to as answers come back."""
    admission = app.state.pool.admission
    done: list[str] = []

    async def send(name: str, headers: dict) -> httpx.Response:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        done.append(name)
        return response

    tasks = [asyncio.ensure_future(send("first", {}))]
    while app.state.pool.total_in_flight < 1:
        await asyncio.sleep(0.002)
    for name, headers in requests:
        asked = Priority[headers.get("x-loragate-priority", "standard").upper()]
        queued = admission.queued(asked)
        tasks.append(asyncio.ensure_future(send(name, headers)))
        for _ in range(500):  # until it waits (or was answered at once: a refusal)
            if admission.queued(asked) != queued or tasks[-1].done():
                break
            await asyncio.sleep(0.002)
    return tasks, done


def priority(name: str | bytes) -> dict:
    return {"x-loragate-priority": name}


async def test_with_the_engine_saturated_critical_is_answered_before_standard_before_sheddable(tmp_path):
    async with saturated_gateway(tmp_path, max_waiting=16, max_wait_s=5) as (client, app):
        tasks, done = await queue_in_order(
            client,
            app,
            [
                ("sheddable-1", priority("sheddable")),
                ("standard-1", {}),
                ("critical-1", priority("critical")),
                ("sheddable-2", priority("sheddable")),
                ("standard-2", priority("standard")),
                ("critical-2", priority("Critical")),
            ],
        )
        assert app.state.pool.admission.waiting == 6
        responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200] * 7
        assert done == ["first", "critical-1", "critical-2", "standard-1", "standard-2", "sheddable-1", "sheddable-2"]
        registry = app.state.metrics.registry
        waited = {
            p: registry.get_sample_value("loragate_admission_wait_seconds_count", {"priority": p})
            for p in ("critical", "standard", "sheddable")
        }
        assert waited == {"critical": 2, "standard": 2, "sheddable": 2}
        mean_wait = {
            p: registry.get_sample_value("loragate_admission_wait_seconds_sum", {"priority": p}) / 2 for p in waited
        }
        assert mean_wait["critical"] < mean_wait["standard"] < mean_wait["sheddable"]


async def test_with_the_engine_saturated_standard_gets_its_share_of_the_slots_while_critical_waits(tmp_path):
    """LORAGATE_PRIORITY_SHARES reaches the served app: at critical=1,standard=1 the freed slots alternate
    between the two classes while both wait (strict priority would answer all four critical ones first)."""
    async with saturated_gateway(tmp_path, max_waiting=16, max_wait_s=5, priority_shares="critical=1,standard=1") as (
        client,
        app,
    ):
        tasks, done = await queue_in_order(
            client,
            app,
            [(f"critical-{i}", priority("critical")) for i in (1, 2, 3, 4)] + [("standard-1", {}), ("standard-2", {})],
        )
        assert app.state.pool.admission.waiting == 6
        responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200] * 7
        assert done == ["first", "critical-1", "standard-1", "critical-2", "standard-2", "critical-3", "critical-4"]
        by_share = app.state.metrics.registry.get_sample_value(
            "loragate_admission_share_handoffs_total", {"priority": "standard"}
        )
        assert by_share == 2


async def test_sheddable_requests_are_shed_first_with_503_and_retry_after(tmp_path):
    async with saturated_gateway(tmp_path, max_waiting=3, max_wait_s=3) as (client, app):
        tasks, done = await queue_in_order(
            client,
            app,
            [
                ("sheddable-1", priority("sheddable")),
                ("standard-1", {}),
                ("sheddable-2", priority("sheddable")),
                ("critical-1", priority("critical")),  # the queue is full: sheddable-2, the newest sheddable, is shed
                ("sheddable-3", priority("sheddable")),  # full, nobody below it: refused at once
                ("standard-2", {}),  # full: displaces sheddable-1
                ("standard-3", {}),
            ],
        )  # full of standard and critical: refused, as overloaded
        responses = dict(
            zip(
                [
                    "first",
                    "sheddable-1",
                    "standard-1",
                    "sheddable-2",
                    "critical-1",
                    "sheddable-3",
                    "standard-2",
                    "standard-3",
                ],
                await asyncio.gather(*tasks),
            )
        )
        assert done[:4] == ["sheddable-2", "sheddable-3", "sheddable-1", "standard-3"]  # refused before any answer
        assert done[4:] == ["first", "critical-1", "standard-1", "standard-2"]
        for name in ("sheddable-1", "sheddable-2", "sheddable-3"):
            shed = responses[name]
            assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
            error = shed.json()["error"]
            assert error["code"] == "priority_shed" and error["type"] == "service_unavailable"
            assert "sheddable" in error["message"] and "Traceback" not in shed.text
        assert responses["standard-3"].status_code == 503
        assert responses["standard-3"].json()["error"]["code"] == "overloaded"
        assert all(responses[n].status_code == 200 for n in ("first", "critical-1", "standard-1", "standard-2"))
        registry = app.state.metrics.registry

        def shed(priority: str, reason: str) -> float:
            return registry.get_sample_value("loragate_admission_shed_total", {"priority": priority, "reason": reason})

        assert (shed("sheddable", "displaced"), shed("sheddable", "queue_full"), shed("standard", "queue_full")) == (
            2,
            1,
            1,
        )
        assert registry.get_sample_value("loragate_admission_rejections_total", {"route": "chat"}) == 4


async def test_a_key_may_use_only_its_classes_403_and_an_unknown_class_is_400(tmp_path):
    async with saturated_gateway(tmp_path, auth=True, api_keys=KEYS) as (client, _app):

        async def ask(key: str, asked: str | bytes | None) -> httpx.Response:
            headers = {"authorization": f"Bearer {key}", **(priority(asked) if asked else {})}
            return await client.post("/v1/chat/completions", json=CHAT, headers=headers)

        refused = await ask("lg-batch", "critical")
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "priority_not_allowed" and error["type"] == "permission_error"
        assert "`critical`" in error["message"] and "allowed: sheddable" in error["message"]
        assert error["param"] == "x-loragate-priority"
        assert (await ask("lg-app", "critical")).json()["error"]["message"].endswith("(allowed: standard, sheddable)")
        unknown = await ask("lg-ops", b"urgent\xe9" * 30)  # not ASCII: header bytes as Latin-1
        assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "invalid_priority"
        assert len(unknown.json()["error"]["message"]) < 200  # the client's value is echoed bounded
        for key, asked in [
            ("lg-batch", None),
            ("lg-batch", "sheddable"),
            ("lg-app", "sheddable"),
            ("lg-ops", "critical"),
            ("lg-ops", None),
        ]:
            assert (await ask(key, asked)).status_code == 200, (key, asked)


class ListLog:
    def __init__(self) -> None:
        self.records: list = []

    def record(self, record) -> None:
        self.records.append(record)


async def test_with_auth_off_the_header_may_ask_for_any_class_and_the_setting_is_the_default(tmp_path):
    async with saturated_gateway(tmp_path, default_priority="sheddable") as (client, app):
        log = app.state.gateway.accounting.request_log = ListLog()
        for asked in ("critical", "standard", "sheddable", None):
            response = await client.post("/v1/chat/completions", json=CHAT, headers=priority(asked) if asked else {})
            assert response.status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=priority(""))).status_code == 400
        assert [r.priority for r in log.records] == ["critical", "standard", "sheddable", "sheddable"]


def test_a_keys_default_class_and_allowed_classes():
    default = Priority.STANDARD
    assert key_policy(None, None, default).allowed == {Priority.STANDARD, Priority.SHEDDABLE}
    assert key_policy("critical", None, default).allowed == set(Priority)
    assert key_policy("sheddable", None, default).allowed == {Priority.SHEDDABLE}
    only_critical = key_policy(None, ["critical"], default)  # the gateway's default is not among its classes
    assert only_critical.default is Priority.CRITICAL and only_critical.of(None) is Priority.CRITICAL
    assert key_policy(None, ["critical", "sheddable"], default).default is Priority.SHEDDABLE
    assert PriorityPolicy(Priority.STANDARD).of(" Sheddable ") is Priority.SHEDDABLE
    with pytest.raises(KeysError, match="must be one of its priorities"):
        parse_keys(f'keys: [{{id: k, sha256: "{hash_key("x")}", priority: critical, priorities: [standard]}}]', "t")
    with pytest.raises(KeysError, match="priority"):
        parse_keys(f'keys: [{{id: k, sha256: "{hash_key("x")}", priority: urgent}}]', "t")
    auth = Authenticator(KeyStore(inline=KEYS), default_priority=Priority.SHEDDABLE)
    assert auth.authenticate({"x-api-key": "lg-app"}).priorities.default is Priority.SHEDDABLE  # type: ignore
    assert auth.authenticate({"x-api-key": "lg-batch"}).priorities.default is Priority.SHEDDABLE  # type: ignore
