"""The request log end to end: real gateway processes, Parquet on disk and on S3 (moto), feedback.

Most tests run the gateway in front of the STUB upstream (tests/stub_upstream.py):
what is tested here is the gateway's log, not the model. One test runs in front
of the real vLLM engine (the session fixture) to check the parsed answer text.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import orjson
import pytest

from loragate.common.scrub import scrub
from loragate.service.requestlog.store import read_table
from tests.metrics_text import sample_sum, scrape
from tests.processes import Service, free_port, start_gateway, start_stub, wait_http

pytestmark = pytest.mark.integration

PII = {
    "email": "maria.lopez@example.org",
    "phone": "+1 415 555 0134",
    "card": "4012 8888 8888 1881",
    "ssn": "078-05-1120",
    "ip": "198.51.100.23",
    "key": "sk-live-9f8e7d6c5b4a39281706abcd",
}
PII_TEXT = (
    f"Hi, I'm {PII['email']} ({PII['phone']}). Card {PII['card']}, SSN {PII['ssn']}, "
    f"my server is {PII['ip']} and the key {PII['key']}."
)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    service, url = start_stub(tmp_path_factory.mktemp("stub") / "stub.log", chunks=8)
    yield url
    service.stop()


def _routes(directory: Path) -> Path:
    routes = directory / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  support:\n"
        "    variants: [{name: v1, adapter: a1, path: /adapters/a1, weight: 1}]\n"
        "    pricing: {prompt_per_1k: 0.001, completion_per_1k: 0.002}\n"
        "  plain:\n"
        "    variants: [{name: base, weight: 1}]\n"
    )
    return routes


def _gateway(directory: Path, upstream: str, log_url: str, name: str = "gateway", **env: str):
    return start_gateway(
        _routes(directory),
        [upstream],
        directory / f"{name}.log",
        extra_env={
            "LORAGATE_REQUEST_LOG_URL": log_url,
            "LORAGATE_REQUEST_LOG_FLUSH_INTERVAL_S": "0.5",
            "LORAGATE_MAX_IN_FLIGHT_PER_UPSTREAM": "1000",
            "LORAGATE_MAX_WAITING": "2000",
            **env,
        },
    )


def _request(index: int, text: str = "hello") -> tuple[str, dict]:
    """A mix of chat and text completions, whole and streamed, over two routes."""
    model = "support" if index % 3 else "plain"
    stream = index % 2 == 0
    if index % 4 == 3:
        return "completions", {"model": model, "prompt": text, "max_tokens": 4, "stream": stream}
    return "chat/completions", {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
        "stream": stream,
    }


async def _send(url: str, requests: list[tuple[str, dict]], concurrency: int) -> list[tuple[int, str, bytes]]:
    """(status, x-request-id, body) of every request, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, endpoint: str, body: dict) -> tuple[int, str, bytes]:
        async with (
            gate,
            session.post(
                f"{url}/v1/{endpoint}", data=orjson.dumps(body), headers={"content-type": "application/json"}
            ) as response,
        ):
            return response.status, response.headers.get("x-request-id", ""), await response.read()

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        return await asyncio.gather(*(one(session, endpoint, body) for endpoint, body in requests))


def _send_all(url: str, requests: list[tuple[str, dict]], concurrency: int = 1) -> list[str]:
    answers = asyncio.run(_send(url, requests, concurrency))
    assert [status for status, _, _ in answers] == [200] * len(requests), answers[:3]
    return [request_id for _, request_id, _ in answers]


def _stop(service: Service) -> None:
    """SIGTERM, as a Kubernetes pod gets; uvicorn shuts down gracefully, then re-raises the signal (-15).

    Every process the gateway started (uvicorn workers, their request-log conversion processes)
    must be gone afterwards: none is left behind as an orphan.
    """
    started = _descendants(service.process.pid)
    assert service.stop() in (0, -15), service.log.read_text()[-2000:]
    assert "Application shutdown complete" in service.log.read_text()
    deadline = time.monotonic() + 5
    while (left := [pid for pid in started if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _children_running(pid: int, marker: bytes) -> list[int]:
    """Children of ``pid`` whose command line holds ``marker``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if (
                int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid
                and marker in (stat.parent / "cmdline").read_bytes()
            ):
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


def _conversion_processes(pid: int, workers: int = 1) -> list[int]:
    """The request log's conversion processes (service/requestlog/process.py): started by the gateway, or by each
    of uvicorn's workers (spawned by multiprocessing)."""
    if workers == 1:
        return _children_running(pid, b"child_main")
    return [
        child for worker in _children_running(pid, b"spawn_main") for child in _children_running(worker, b"child_main")
    ]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_every_request_is_logged_through_a_burst_and_a_graceful_restart(stub, tmp_path):
    root = tmp_path / "log"
    service, url = _gateway(tmp_path, stub, str(root), name="first")
    sent = _send_all(url, [_request(i) for i in range(40)])
    sent += _send_all(url, [_request(i) for i in range(500)], concurrency=500)  # the burst
    assert len(_conversion_processes(service.process.pid)) == 1  # the default: rows made in a child
    metrics = scrape(url)
    assert sample_sum(metrics, "loragate_requestlog_records_total", result="dropped") == 0
    _stop(service)  # SIGTERM: the lifespan flushes everything queued
    ids = read_table(str(root), "requests").column("request_id").to_pylist()
    assert len(ids) == len(sent) == 540
    assert sorted(ids) == sorted(sent)

    service, url = _gateway(tmp_path, stub, str(root), name="second")  # same directory, new writer
    sent += _send_all(url, [_request(i) for i in range(60)], concurrency=20)
    _stop(service)
    table = read_table(str(root), "requests")
    assert table.num_rows == len(sent) == 600
    assert sorted(table.column("request_id").to_pylist()) == sorted(sent)
    names = [p.name for p in root.rglob("*") if p.is_file()]
    assert all(re.fullmatch(r"[A-Za-z0-9.-]+-\d{8}T\d{9}Z-\d{6}\.parquet", n) for n in names), names
    rows = table.to_pylist()
    assert {r["endpoint"] for r in rows} == {"chat/completions", "completions"}
    assert {r["stream"] for r in rows} == {True, False}
    assert all(r["status"] == 200 and r["finish_reason"] == "length" and r["response_text"] for r in rows)
    assert all((r["ttft_s"] is not None) == r["stream"] for r in rows)
    support = [r for r in rows if r["route"] == "support"]
    assert support and all(r["variant"] == "v1" and r["cost_usd"] > 0 for r in support)


@pytest.mark.parametrize("convert", ["process", "thread"])
def test_two_workers_write_into_one_directory(stub, tmp_path, convert):
    root = tmp_path / "log"
    service, url = _gateway(tmp_path, stub, str(root), LORAGATE_WORKERS="2", LORAGATE_REQUEST_LOG_CONVERT=convert)
    sent = _send_all(url, [_request(i) for i in range(200)], concurrency=50)
    expected = 2 if convert == "process" else 0
    deadline = time.monotonic() + 30  # on a loaded machine the second worker may still be starting
    while len(_conversion_processes(service.process.pid, workers=2)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_conversion_processes(service.process.pid, workers=2)) == expected
    _stop(service)
    assert sorted(read_table(str(root), "requests").column("request_id").to_pylist()) == sorted(sent)


def test_planted_pii_never_reaches_storage(stub, tmp_path):
    root = tmp_path / "log"
    service, url = _gateway(tmp_path, stub, str(root))
    sent = _send_all(url, [_request(i, PII_TEXT) for i in range(8)])
    feedback = urllib.request.Request(
        f"{url}/v1/feedback",
        method="POST",
        headers={"content-type": "application/json"},
        data=orjson.dumps({"request_id": sent[0], "label": "bad", "correction": f"Should have asked {PII['email']}"}),
    )
    with urllib.request.urlopen(feedback) as answer:
        assert answer.status == 200
    _stop(service)
    requests, feedback_rows = read_table(str(root), "requests"), read_table(str(root), "feedback")
    assert requests.num_rows == 8 and feedback_rows.num_rows == 1
    stored = repr(requests.to_pylist()) + repr(feedback_rows.to_pylist())
    for secret in PII.values():
        assert secret not in stored
    for placeholder in ("[EMAIL]", "[PHONE]", "[CARD]", "[NATIONAL_ID]", "[IP]", "[SECRET]"):
        assert placeholder in stored
    raw = b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())
    for secret in PII.values():
        assert secret.encode() not in raw


def test_feedback_is_stored_and_counted(stub, tmp_path):
    root = tmp_path / "log"
    service, url = _gateway(tmp_path, stub, str(root), LORAGATE_FEEDBACK_LABELS="good,bad")
    served = _send_all(url, [_request(1), _request(2)])

    def post(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{url}/v1/feedback", method="POST", data=orjson.dumps(body), headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request) as answer:
                return answer.status, orjson.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, orjson.loads(error.read())

    assert post({"request_id": served[0], "score": 1, "label": "good"}) == (
        200,
        {"object": "feedback", "request_id": served[0], "route": "support", "variant": "v1"},
    )
    assert post({"request_id": served[1], "score": 0, "label": "free text label"})[0] == 200
    assert post({"request_id": "never-served", "label": "bad"})[1]["route"] is None
    status, error = post({"request_id": served[0], "score": "great"})
    assert status == 400 and error["error"]["param"] == "score"
    metrics = scrape(url)
    assert sample_sum(metrics, "loragate_feedback_total", route="support", variant="v1", label="good") == 1
    assert sample_sum(metrics, "loragate_feedback_total", route="support", variant="v1", label="other") == 1
    assert sample_sum(metrics, "loragate_feedback_total", route="_unknown", label="bad") == 1
    assert sample_sum(metrics, "loragate_feedback_score_count", route="support") == 2
    _stop(service)
    rows = read_table(str(root), "feedback").to_pylist()
    assert sorted((r["request_id"], r["label"], r["score"]) for r in rows) == sorted(
        [(served[0], "good", 1.0), (served[1], "free text label", 0.0), ("never-served", "bad", None)]
    )


@pytest.fixture
def moto(tmp_path):
    port = free_port()
    service = Service([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], tmp_path / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", service.process, 30, tmp_path / "moto.log")
        yield endpoint
    finally:
        service.stop()


def test_s3_storage_through_moto(stub, tmp_path, moto, monkeypatch):
    import boto3

    credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    s3.create_bucket(Bucket="loragate-logs")
    service, url = _gateway(
        tmp_path,
        stub,
        "s3://loragate-logs/prod/eu",
        LORAGATE_REQUEST_LOG_S3_ENDPOINT=moto,
        LORAGATE_REQUEST_LOG_S3_REGION="us-east-1",
    )
    sent = _send_all(url, [_request(i) for i in range(120)], concurrency=30)
    _stop(service)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="loragate-logs")["Contents"]]
    assert keys and all(
        re.fullmatch(
            r"prod/eu/requests/date=\d{4}-\d\d-\d\d/[A-Za-z0-9.-]+-\d{8}T\d{9}Z-\d{6}"
            r"\.parquet",
            key,
        )
        for key in keys
    ), keys
    table = read_table("s3://loragate-logs/prod/eu", "requests", s3_endpoint=moto, s3_region="us-east-1")
    assert sorted(table.column("request_id").to_pylist()) == sorted(sent)

    # The monitor reaches the same store through the gateway's own settings (loragate.common.objectstore):
    # the log window, a reference dataset in the bucket, and the retraining export back into it.
    monkeypatch.setenv("LORAGATE_REQUEST_LOG_S3_ENDPOINT", moto)
    monkeypatch.setenv("LORAGATE_REQUEST_LOG_S3_REGION", "us-east-1")
    from loragate.common.objectstore import S3Options
    from loragate.monitoring.sources import RequestLog, Window, load_reference
    from loragate.monitoring.triggers.dataset import write_jsonl

    window = Window.between(time.time() - 600, time.time() + 60)
    assert sorted(RequestLog("s3://loragate-logs/prod/eu").requests(window)["request_id"]) == sorted(sent)
    s3.put_object(
        Bucket="loragate-logs",
        Key="ref/train.jsonl",
        Body=b'{"prompt": "hi", "response": "hello"}\n{"prompt": "bye", "response": "ciao"}\n',
    )
    assert list(load_reference("s3://loragate-logs/ref/train.jsonl")["prompt_text"]) == ["hi", "bye"]
    write_jsonl([{"messages": []}], "s3://loragate-logs/datasets/a.jsonl", S3Options.resolve())
    assert s3.get_object(Bucket="loragate-logs", Key="datasets/a.jsonl")["Body"].read() == b'{"messages": []}\n'


def test_real_engine_answers_are_logged(engine, demo_model, tmp_path):
    """In front of real vLLM: the parsed text is what the client received, the counts are vLLM's."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  adapter:\n    variants: [{name: a1, adapter: a1, weight: 1}]\n"
        "  base:\n    variants: [{name: base, weight: 1}]\n"
    )
    root = tmp_path / "log"
    service, url = start_gateway(
        routes,
        [engine],
        tmp_path / "gateway.log",
        extra_env={"LORAGATE_REQUEST_LOG_URL": str(root), "LORAGATE_REQUEST_LOG_TEXT": "full"},
    )
    wait_http(f"{url}/readyz", service.process, 30, tmp_path / "gateway.log")
    requests = [
        (
            "chat/completions",
            {
                "model": "adapter",
                "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": 6,
                "temperature": 0,
            },
        ),
        (
            "chat/completions",
            {
                "model": "adapter",
                "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": 6,
                "temperature": 0,
                "stream": True,
            },
        ),
        ("completions", {"model": "base", "prompt": "def main():", "max_tokens": 5, "temperature": 0}),
    ]
    answers = asyncio.run(_send(url, requests, concurrency=3))
    assert [a[0] for a in answers] == [200, 200, 200]
    _stop(service)
    rows = {r["request_id"]: r for r in read_table(str(root), "requests").to_pylist()}
    assert len(rows) == 3
    whole, streamed, text = (rows[a[1]] for a in answers)
    assert whole["response_text"] == orjson.loads(answers[0][2])["choices"][0]["message"]["content"]
    assert streamed["response_text"] == whole["response_text"]  # same prompt, temperature 0
    assert streamed["stream"] and streamed["ttft_s"] > 0 and streamed["completion_tokens"] == 6
    assert text["response_text"] == orjson.loads(answers[2][2])["choices"][0]["text"]
    assert whole["prompt_text"] == "user: Tell me a story" and text["prompt_text"] == "def main():"
    assert whole["prompt_messages"] == [{"role": "user", "content": "Tell me a story"}]
    assert text["prompt_messages"] is None and {r["schema_version"] for r in rows.values()} == {2}
    assert {r["finish_reason"] for r in rows.values()} == {"length"}
    assert (whole["variant"], text["variant"]) == ("a1", "base")
    assert whole["prompt_tokens"] > 0 and whole["completion_tokens"] == 6


def test_a_hostile_prompt_cannot_stop_the_log(stub, tmp_path):
    """The issue's reproduction, on the real gateway and its real conversion process: a keyword then 200,000
    spaces (a scrubber that backtracks on it would take about a day), then ordinary requests. Every record is in
    the Parquet log within two flush intervals, the hostile one with its text scrubbed or withheld (never as
    sent), and a graceful shutdown right after finishes within its bound."""
    root = tmp_path / "log"
    flush_s, close_s = 10.0, 10.0
    service, url = _gateway(
        tmp_path,
        stub,
        str(root),
        LORAGATE_REQUEST_LOG_FLUSH_INTERVAL_S=str(flush_s),
        LORAGATE_REQUEST_LOG_CLOSE_TIMEOUT_S=str(close_s),
    )  # the stall floor: its default
    try:
        hostile = "passport" + " " * 200_000 + "x1"
        started = time.monotonic()
        hostile_id = _send_all(
            url,
            [
                (
                    "chat/completions",
                    {"model": "support", "max_tokens": 4, "messages": [{"role": "user", "content": hostile}]},
                )
            ],
        )
        ordinary = _send_all(url, [_request(index, text=f"ordinary {index}") for index in range(5)])
        sent = hostile_id + ordinary
        while time.monotonic() - started < 2 * flush_s:
            found = _logged(root)
            if set(sent) <= set(found):
                break
            time.sleep(0.25)
        took = time.monotonic() - started
        found = _logged(root)
        print(f"all {len(sent)} records logged {took:.1f}s after the hostile request was sent")
        assert set(sent) <= set(found), (took, sorted(set(sent) - set(found)), service.log.read_text()[-3000:])
        text = found[hostile_id[0]]
        # Withheld, or scrubbed: what the scrubber makes of it (the near-miss "x1" is no id, so nothing to replace).
        assert text is None or text == f"user: {scrub(hostile)}"
        assert all(found[request_id] and "ordinary" in found[request_id] for request_id in ordinary)
        metrics = scrape(url)
        withheld = sample_sum(metrics, "loragate_requestlog_records_total", result="text_withheld")
        assert withheld == (1 if text is None else 0)
        if text is None:  # the watchdog, not the scrubber, kept the log going: it says which request
            assert hostile_id[0] in service.log.read_text()
    except BaseException:
        service.stop()
        raise
    stopping = time.monotonic()
    _stop(service)
    print(f"graceful shutdown: {time.monotonic() - stopping:.1f}s")
    assert time.monotonic() - stopping < close_s + 5  # the log's bound, and uvicorn's own few seconds


def _logged(root: Path) -> dict[str, str | None]:
    """request id -> prompt text of every request in the log so far."""
    if not any(root.rglob("*.parquet")):
        return {}
    table = read_table(str(root), "requests")
    return dict(zip(table.column("request_id").to_pylist(), table.column("prompt_text").to_pylist()))
