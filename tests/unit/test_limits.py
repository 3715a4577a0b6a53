"""Limiters: the Lua buckets on a real redis-server against the in-process ones, key ids, outages, bad URLs."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from loragate.service.limits import LocalLimiter, RedisLimiter, Refusal, redis_key
from loragate.service.metrics import Metrics
from loragate.service.resp import RedisReplyError, RedisUnavailable, RespClient, RespReader, encode
from loragate.service.settings import Settings
from tests.processes import ROOT, free_port
from tests.redis_server import RedisServer


class Key:
    def __init__(self, key_id: str, rpm: int | None = None, tpm: int | None = None) -> None:
        self.id, self.requests_per_minute, self.tokens_per_minute = key_id, rpm, tpm


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def limiter(redis_server):
    metrics = Metrics()
    shared = RedisLimiter(redis_server.url, metrics)
    await shared.start()
    await shared.client.call("FLUSHDB")
    yield shared
    await shared.close()


def backend(metrics: Metrics) -> str:
    on = [
        b
        for b in ("redis", "fallback", "refusing", "in_process")
        if metrics.registry.get_sample_value("loragate_limits_backend", {"backend": b}) == 1
    ]
    assert len(on) == 1, on
    return on[0]


async def test_requests_per_minute_admit_exactly_the_allowance(limiter: RedisLimiter) -> None:
    key = Key("alice", rpm=5)
    outcomes = [await limiter.admit(key) for _ in range(7)]
    assert outcomes[:5] == [None] * 5
    for refusal in outcomes[5:]:
        assert refusal.reason == "request_rate"
        assert 11.5 < refusal.wait_s <= 12.001  # 1 request refills in 60/5 = 12 s
    assert await limiter.admit(Key("bob", rpm=5)) is None  # keys do not share buckets


async def test_tokens_are_charged_after_and_can_overdraw(limiter: RedisLimiter) -> None:
    key = Key("carol", tpm=60)
    assert await limiter.admit(key) is None  # tokens are not taken on admission
    assert await limiter.admit(key) is None
    limiter.charge(key, 90)  # 60 - 90 = -30: 31 tokens short at 1 a second
    await limiter.flush()
    refusal = await limiter.admit(key)
    assert refusal.reason == "token_rate" and 30.5 < refusal.wait_s <= 31.001


async def test_the_longer_wait_wins_and_matches_the_in_process_limiter(limiter: RedisLimiter) -> None:
    clock = [1000.0]
    local = LocalLimiter(lambda: clock[0])
    key = Key("dave", rpm=2, tpm=6)
    for each in (limiter, local):
        assert await _admit(each, key) is None
        each.charge(key, 66)  # -60 at 6 a minute: 610 s to get back to 1
    await limiter.flush()
    shared, alone = await _admit(limiter, key), await _admit(local, key)
    assert shared.reason == alone.reason == "token_rate"
    assert abs(shared.wait_s - alone.wait_s) < 0.5 and 609 < shared.wait_s <= 610.001


async def test_a_lowered_limit_applies_at_once_without_a_reset(limiter: RedisLimiter) -> None:
    assert await limiter.admit(Key("erin", rpm=100)) is None  # 99 left
    for _ in range(3):
        assert await limiter.admit(Key("erin", rpm=3)) is None  # capped at 3, then 2, 1, 0
    assert (await limiter.admit(Key("erin", rpm=3))).reason == "request_rate"


async def test_state_expires_once_the_buckets_would_be_full(limiter: RedisLimiter) -> None:
    assert await limiter.admit(Key("frank", rpm=60)) is None  # 1 s to refill, kept 1 s + 1 s margin
    ttl_ms = await limiter.client.call("PTTL", redis_key("frank"))
    assert 1000 < ttl_ms <= 2000


@pytest.mark.parametrize("key_id", ["a b", "{tag}", "x*?[]", "ключ", "new\nline", "a:b:c", "", "\x00", "🔑" * 40])
async def test_odd_key_ids_make_safe_distinct_redis_keys(limiter: RedisLimiter, key_id: str) -> None:
    name = redis_key(key_id)
    assert re.fullmatch(r"loragate:limits:[0-9a-f]{32}", name)
    assert name != redis_key(key_id + "x")
    key = Key(key_id, rpm=1)
    assert await limiter.admit(key) is None
    assert (await limiter.admit(key)).reason == "request_rate"
    assert await limiter.client.call("EXISTS", name) == 1


async def test_unreachable_redis_fails_open_then_comes_back(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "loragate.limits")
    server = RedisServer(tmp_path)  # not started yet: nothing listens on its port
    metrics = Metrics()
    shared = RedisLimiter(server.url, metrics)
    await shared.start()
    assert backend(metrics) == "fallback"
    key = Key("gina", rpm=2)
    assert [shared.admit(key), shared.admit(key)] == [None, None]  # decided in process, no round trip
    assert shared.admit(key).reason == "request_rate"
    await shared.probe()
    assert backend(metrics) == "fallback"
    server.start()
    try:
        await shared.probe()
        assert backend(metrics) == "redis"
        assert await shared.admit(key) is None  # Redis has its own, fresh buckets
        server.stop()
        assert await shared.admit(Key("ivy", rpm=100)) is None  # the round trip fails: decided in process
        assert backend(metrics) == "fallback"
    finally:
        server.stop()
        await shared.close()
    changes = [r.getMessage() for r in caplog.records if r.name == "loragate.limits" and r.levelno >= logging.WARNING]
    assert len(changes) == 3  # down (at start), back, down again: one line each
    assert metrics.registry.get_sample_value("loragate_limits_backend_changes_total", {"backend": "fallback"}) == 2


async def test_unreachable_redis_fails_closed_when_asked(tmp_path) -> None:
    metrics = Metrics()
    shared = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", metrics, fail_closed=True, retry_after_s=5)
    await shared.start()
    assert backend(metrics) == "refusing"
    assert shared.admit(Key("hal", rpm=100)) == Refusal("limiter_unavailable", 5)
    await shared.close()


async def test_a_flushed_script_cache_is_loaded_again(limiter: RedisLimiter) -> None:
    await limiter.client.call("SCRIPT", "FLUSH")  # what a restarted Redis looks like
    assert await limiter.admit(Key("jack", rpm=1)) is None
    assert await limiter.client.call("SCRIPT", "EXISTS", limiter._sha) == [1]


def test_resp_replies_parse_whole_or_not_at_all() -> None:
    stream = b"+PONG\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:0\r\n:1500\r\n-NOSCRIPT No matching script\r\n"
    reader, replies = RespReader(), []
    reader.feed(stream)
    while (reply := reader.gets()) is not False:
        replies.append(reply)
    assert replies[:5] == [b"PONG", 42, b"abc", None, [0, 1500]]
    assert isinstance(replies[5], RedisReplyError) and str(replies[5]).startswith("NOSCRIPT")
    for cut in range(1, len(b"*2\r\n:0\r\n:1500\r\n")):  # any prefix of a reply is "not yet"
        reader = RespReader()
        reader.feed(b"*2\r\n:0\r\n:1500\r\n"[:cut])
        assert reader.gets() is False
    assert encode(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


async def test_pipelined_calls_get_their_own_replies(redis_server) -> None:
    client = RespClient(redis_server.url)
    try:
        replies = await asyncio.gather(*(client.call("ECHO", f"n{i}") for i in range(200)))
        assert replies == [f"n{i}".encode() for i in range(200)]
        with pytest.raises(RedisReplyError):
            await client.call("NOSUCHCOMMAND")
        assert await client.call("PING") == b"PONG"  # the connection survives an error reply
    finally:
        await client.close()


async def test_a_silent_server_times_out() -> None:
    async def mute(reader, writer):
        await asyncio.sleep(5)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(RedisUnavailable, match="no reply"):
            await client.call("PING")
        assert asyncio.get_running_loop().time() - started < 1
    finally:
        await client.close()
        server.close()


async def test_a_password_from_the_url_or_given_apart(tmp_path) -> None:
    server = RedisServer(tmp_path, args=("--requirepass", "p@ss/word")).start()
    try:
        for client in (
            RespClient(f"redis://:p%40ss%2Fword@127.0.0.1:{server.port}/3"),
            RespClient(f"redis://127.0.0.1:{server.port}/3", password="p@ss/word"),
        ):
            assert await client.call("PING") == b"PONG"
            await client.call("SET", "k", "v")  # in database 3
            await client.close()
        wrong = RespClient(f"redis://127.0.0.1:{server.port}/0", password="nope")
        with pytest.raises(RedisUnavailable, match="setup"):
            await wrong.call("PING")
        await wrong.close()
        other_db = RespClient(f"redis://127.0.0.1:{server.port}/0", password="p@ss/word")
        assert await other_db.call("EXISTS", "k") == 0
        await other_db.close()
    finally:
        server.stop()


async def test_limited_keys_get_503_while_the_shared_limiter_fails_closed(tmp_path) -> None:
    from loragate.service.apikeys import KeyStore, hash_key
    from loragate.service.auth import Authenticator
    from loragate.service.errors import GatewayError

    keys = tmp_path / "keys.yaml"
    keys.write_text(
        f'keys:\n  - {{id: "team-a", sha256: "{hash_key("lg-a")}", requests_per_minute: 5}}\n'
        f'  - {{id: "team-b", sha256: "{hash_key("lg-b")}"}}\n'
    )
    metrics = Metrics()
    shared = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", metrics, fail_closed=True, retry_after_s=2)
    await shared.start()
    auth = Authenticator(KeyStore(keys), metrics=metrics, limiter=shared)
    with pytest.raises(GatewayError) as refused:
        auth.authenticate({"authorization": "Bearer lg-a"}).admit("any")
    assert (refused.value.status, refused.value.code, refused.value.headers["retry-after"]) == (
        503,
        "limiter_unavailable",
        "2",
    )
    assert auth.authenticate({"authorization": "Bearer lg-b"}).admit("any") is None  # no limits: not affected
    assert (
        metrics.registry.get_sample_value(
            "loragate_limit_rejections_total", {"key_id": "team-a", "reason": "limiter_unavailable"}
        )
        == 1
    )
    await shared.close()


@pytest.mark.parametrize(
    "url, problem",
    [
        ("http://cache:6379", "scheme must be redis://"),
        ("redis://cache:notaport/0", "port must be a number"),
        ("redis://:6379/0", "no host"),
        ("redis://cache:6379/zero", "database after the host must be a number"),
        ("redis//cache:6379", "scheme must be redis://"),
    ],
)
def test_bad_redis_urls_are_refused_by_the_settings(url: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Settings(limits_url=url)
    assert Settings(limits_url=" ").limits_url is None


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loragate", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "LORAGATE_PORT": str(free_port()), **env},
    )


def test_a_malformed_redis_url_stops_the_gateway_with_a_clear_message() -> None:
    done = _serve({"LORAGATE_LIMITS_URL": "redis://:s3cret@cache:port/0"})
    assert done.returncode == 2
    assert "LORAGATE_LIMITS_URL" in done.stderr and "port must be a number" in done.stderr
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr


def test_a_host_that_never_resolves_stops_the_gateway_with_a_clear_message(tmp_path) -> None:
    (tmp_path / "routes.yaml").write_text("routes:\n  plain:\n    variants: [{name: base, weight: 1}]\n")
    done = _serve(
        {
            "LORAGATE_UPSTREAMS": "http://127.0.0.1:1,http://no-such-engine.invalid:8000",
            "LORAGATE_DISCOVERY_START_TIMEOUT_S": "1",
            "LORAGATE_ROUTES_FILE": str(tmp_path / "routes.yaml"),
        }
    )
    assert done.returncode == 2
    assert "no-such-engine.invalid" in done.stderr and "does not resolve" in done.stderr
    assert "Traceback" not in done.stderr


async def _admit(limiter, key):
    outcome = limiter.admit(key)
    return outcome if outcome is None or isinstance(outcome, Refusal) else await outcome
