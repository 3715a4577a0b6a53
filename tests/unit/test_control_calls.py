"""The control calls' boundary (service/transport.py's ControlClient, service/aiohttpedge.py over aiohttp) and what
each of its users makes of a transport error: the replica set's health check (unhealthy) and /metrics scrape (no
engine state: the picker falls back to the gateway's own in-flight counts), the adapter loader (the load fails with
its reason, the unload leaves the adapter listed).

The peers are scripted servers on loopback (tests/wire_peers.py's steps: bytes, pauses, CLOSE); a refused
connection is a port nothing listens on."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from loragate.service.adapterloads import ANSWER_MAX_BYTES, AdapterLoader, AdapterUnavailable
from loragate.service.aiohttpedge import AiohttpControl
from loragate.service.enginestate import MAX_METRICS_BYTES
from loragate.service.metrics import Metrics
from loragate.service.replicas import MODELS_MAX_BYTES, Replica, ReplicaSet
from loragate.service.transport import (
    ConnectFailed,
    Disconnected,
    IncompleteAnswer,
    MalformedAnswer,
    Reply,
    Timeout,
    TransportError,
    TransportTimeout,
)
from loragate.service.upstreams import Pool
from tests.wire_peers import CLOSE, Script, play

METRICS = (
    b'vllm:num_requests_running{model_name="base"} 1\n'
    b'vllm:num_requests_waiting{model_name="base"} 0\n'
    b'vllm:kv_cache_usage_perc{model_name="base"} 0.5\n'
)
MODELS = orjson.dumps({"data": [{"id": "base", "parent": None}, {"id": "a", "parent": "base", "root": "/a"}]})


def answer(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body


def chunked_forever(piece: bytes) -> Script:
    """A chunked body that never ends (the peer writes it as fast as it is read)."""
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", *([chunk] * 100_000)]


class Peer:
    """An HTTP/1.1 server on loopback answering each request by its path: ``routes[path]`` is the script played.
    ``requests`` keeps (method, path, headers, body) of each; ``closed`` counts connections the client closed."""

    def __init__(self, routes: dict[str, Script]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, bytes, bytes]] = []
        self.closed = 0
        self._handlers: set[asyncio.Task] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ")[:2]
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append((method.decode(), path.decode(), head, body))
                if not await play(writer, self.routes[path.decode()]):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed += 1
        except asyncio.CancelledError:  # the test is over (see running)
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            for task in self._handlers:  # a peer still sleeping in its script
                task.cancel()
            await asyncio.gather(*self._handlers)


def refused_url() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def control() -> AsyncIterator[AiohttpControl]:
    async with aiohttp.ClientSession() as session:
        yield AiohttpControl(session)


# --- the boundary over aiohttp: whole bodies, bounded, and every failure one of transport.py's errors ---


async def test_get_and_post_return_the_whole_answer_even_when_it_comes_in_pieces():
    pieces = [b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhalf ", 0.05, b"a body"]
    peer = Peer({"/metrics": pieces, "/v1/load_lora_adapter": [answer(b"nope", "400 Bad Request")]})
    async with peer.running() as url, control() as client:
        got = await client.get(f"{url}/metrics", timeout=Timeout(total=5), max_bytes=11)
        refused = await client.post(
            f"{url}/v1/load_lora_adapter", b'{"lora_name":"a"}', timeout=Timeout(total=5), max_bytes=100
        )
    assert got == Reply(200, b"half a body")  # not the first piece only (aiohttp's content.read(n) stops there)
    assert refused == Reply(400, b"nope")  # any status is an answer, not an error
    method, _path, head, body = peer.requests[1]
    assert method == "POST" and body == b'{"lora_name":"a"}' and b"content-type: application/json" in head.lower()


async def test_refused_silent_and_cut_off_peers_end_in_transport_errors():
    peer = Peer(
        {"/silent": [5.0], "/cut": [b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", CLOSE], "/closed": [CLOSE]}
    )
    async with peer.running() as url, control() as client:
        with pytest.raises(ConnectFailed):
            await client.get(f"{refused_url()}/health", timeout=Timeout(total=5), max_bytes=100)
        started = time.monotonic()
        with pytest.raises(TransportTimeout):
            await client.get(f"{url}/silent", timeout=Timeout(total=0.3), max_bytes=100)
        assert time.monotonic() - started < 2.0
        with pytest.raises(IncompleteAnswer):
            await client.get(f"{url}/cut", timeout=Timeout(total=5), max_bytes=1000)
        with pytest.raises(Disconnected):
            await client.get(f"{url}/closed", timeout=Timeout(total=5), max_bytes=1000)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_body_over_max_bytes_is_malformed_and_its_connection_closed(declared):
    limit = 256 << 10
    script = (
        [b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (limit + 1), b"x" * 1000]
        if declared
        else chunked_forever(b"x" * 4096)
    )  # endless: only the limit ends it
    peer = Peer({"/metrics": script})
    async with peer.running() as url, control() as client:
        started = time.monotonic()
        with pytest.raises(MalformedAnswer, match=f"over {limit} bytes"):
            await client.get(f"{url}/metrics", timeout=Timeout(total=10), max_bytes=limit)
        assert time.monotonic() - started < 3.0  # declared: at once, without waiting for the body
        for _ in range(100):
            if peer.closed:
                break
            await asyncio.sleep(0.02)
        assert peer.closed == 1  # never back in the pool with the rest of the body unread


# --- the replica set: health checks and scrapes ---


def replica_set(url: str, metrics: Metrics, client: object, **kwargs: float) -> ReplicaSet:
    replicas = ReplicaSet([url], metrics, **kwargs)
    replicas.client = client  # type: ignore[assignment]
    return replicas


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_a_health_check_that_ends_in_a_transport_error_marks_the_replica_unhealthy():
    big_models = [b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (MODELS_MAX_BYTES + 1), 5.0]
    healthy = {"/health": [answer(b"")], "/v1/models": [answer(MODELS)]}
    cases = {
        "refused": None,
        "silent": {"/health": [5.0]},
        "models over the limit": {"/health": [answer(b"")], "/v1/models": big_models},
        "models cut off": {"/health": [answer(b"")], "/v1/models": [answer(MODELS)[:-5], CLOSE]},
    }
    async with control() as client:
        for case, routes in cases.items():
            peer = Peer(routes or {})
            async with peer.running() as url:
                url = refused_url() if routes is None else url
                metrics = Metrics(CollectorRegistry())
                replicas = replica_set(url, metrics, client, health_timeout_s=0.5)
                (replica,) = replicas.replicas
                replica.healthy = True
                started = time.monotonic()
                await replicas.check(replica)
                assert not replica.healthy, case
                assert sample(metrics, "loragate_upstream_healthy", upstream=url) == 0, case
                assert time.monotonic() - started < 3.0, case
        peer = Peer(healthy)  # the control: the same set over a peer that answers
        async with peer.running() as url:
            replicas = replica_set(url, Metrics(CollectorRegistry()), client)
            await replicas.check(replicas.replicas[0])
            assert replicas.replicas[0].healthy and replicas.replicas[0].adapters == {"a"}


async def test_a_scrape_that_ends_in_a_transport_error_falls_back_to_the_gateways_own_counts():
    cases = {
        "refused": None,
        "silent": {"/metrics": [5.0]},
        "over 1 MiB": {"/metrics": chunked_forever(b"# padding\n" * 400)},
        "cut off": {"/metrics": [answer(METRICS)[:-10], CLOSE]},
    }
    async with control() as client:
        for case, routes in cases.items():
            peer = Peer(routes or {})
            async with peer.running() as url:
                url = refused_url() if routes is None else url
                metrics = Metrics(CollectorRegistry())
                replicas = replica_set(url, metrics, client, scrape_timeout_s=0.5)
                (replica,) = replicas.replicas
                await replicas.scrape(replica)
                assert replica.engine is None, case
                assert sample(metrics, "loragate_engine_scrape_errors_total", upstream=url) == 1, case
                assert "in-flight" in replicas.view(replica)["engine"]["fallback"], case
        peer = Peer({"/metrics": [answer(METRICS)]})  # the control: a good scrape is read
        async with peer.running() as url:
            replicas = replica_set(url, Metrics(CollectorRegistry()), client)
            await replicas.scrape(replicas.replicas[0])
            engine = replicas.replicas[0].engine
            assert engine is not None and engine.running == 1 and engine.kv_usage == 0.5
    assert MAX_METRICS_BYTES == 1 << 20


# --- the adapter loader ---


def loader(metrics: Metrics, client: object, **kwargs: float) -> AdapterLoader:
    adapters = AdapterLoader(metrics, failure_ttl_s=30, **kwargs)
    adapters.client = client  # type: ignore[assignment]
    return adapters


async def test_a_load_that_ends_in_a_transport_error_fails_with_its_reason(caplog):
    cases = {
        "refused": (None, "ConnectFailed"),
        "silent": ({"/v1/load_lora_adapter": [5.0]}, "TransportTimeout"),
        "answer over the limit": ({"/v1/load_lora_adapter": chunked_forever(b"y" * 4096)}, "MalformedAnswer"),
    }
    async with control() as client:
        for case, (routes, reason) in cases.items():
            peer = Peer(routes or {})
            async with peer.running() as url:
                url = refused_url() if routes is None else url
                metrics = Metrics(CollectorRegistry())
                replica = Replica(url, healthy=True)
                caplog.clear()
                with pytest.raises(AdapterUnavailable) as raised:
                    await loader(metrics, client, load_timeout_s=0.5).ensure(replica, "a", "/adapters/a", "first")
                assert raised.value.outcome == "error", case
                assert "a" in replica.failed_adapters and "a" not in replica.adapters, case
                assert sample(metrics, "loragate_adapter_loads_total", upstream=url, adapter="a", result="error") == 1
                assert reason in caplog.text, case
    assert ANSWER_MAX_BYTES < 4096 * 100_000


async def test_an_unload_that_ends_in_a_transport_error_leaves_the_adapter_listed():
    async with control() as client:
        replica = Replica(refused_url(), healthy=True, adapters={"a"}, loaded_by_gateway={"a": "/adapters/a"})
        changes: list[None] = []
        adapters = loader(Metrics(CollectorRegistry()), client)
        adapters.on_change = lambda: changes.append(None)
        assert not await adapters.unload(replica, "a", "lru")
        assert replica.adapters == {"a"} and replica.loaded_by_gateway == {"a": "/adapters/a"}
        assert changes  # the set reindexed while it was off the list, and again when it came back


# --- the users depend on the boundary alone: any TransportError, from any client, ends the same way ---


class FailingControl:
    """A ControlClient whose every call raises ``error``: a stand-in for a client other than aiohttp."""

    def __init__(self, error: Callable[[], TransportError]) -> None:
        self.error = error
        self.calls: list[str] = []

    async def get(self, url: str, *, timeout: Timeout, max_bytes: int) -> Reply:
        self.calls.append(url)
        raise self.error()

    async def post(self, url: str, json: bytes, *, timeout: Timeout, max_bytes: int) -> Reply:
        self.calls.append(url)
        raise self.error()


ERRORS = {
    "connect": lambda: ConnectFailed("10.0.0.1", 8000, ConnectionRefusedError(111, "refused")),
    "timeout": lambda: TransportTimeout("no answer in time"),
    "disconnected": lambda: Disconnected("closed"),
    "incomplete": lambda: IncompleteAnswer("cut"),
    "too large": lambda: MalformedAnswer("a body over 1 bytes"),
    "other": lambda: TransportError("anything else"),
}


@pytest.mark.parametrize("error", ERRORS.values(), ids=ERRORS.keys())
async def test_every_transport_error_of_any_client_ends_as_the_same_outcome(error):
    url = "http://10.0.0.1:8000"
    client = FailingControl(error)
    metrics = Metrics(CollectorRegistry())
    pool = Pool([url], metrics)
    pool.bind(client)
    (replica,) = pool.replicas
    replica.healthy = True
    await pool.check_all()
    assert not replica.healthy and client.calls == [f"{url}/health"]
    replica.healthy = True
    await pool.scrape_all()
    assert replica.engine is None and sample(metrics, "loragate_engine_scrape_errors_total", upstream=url) == 1
    with pytest.raises(AdapterUnavailable) as raised:
        await pool.loader.ensure(replica, "a", "/adapters/a", "first")
    assert raised.value.outcome == "error" and "a" in replica.failed_adapters
    replica.adapters.add("b")
    assert not await pool.loader.unload(replica, "b", "lru") and "b" in replica.adapters
