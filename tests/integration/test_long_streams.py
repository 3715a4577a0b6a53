"""Long streams through the real gateway (``loragate serve``: create_app under uvicorn) to the STUB upstream
(tests/stub_upstream.py, not vLLM), read by slow clients that pause at random points, many rounds over
keep-alive connections.

The defect this guards: a stream whose last bytes reached the gateway in the read that crossed the upstream
client's backpressure threshold (service/httpclient.py PAUSE_AT) went back to the pool with reading paused, and
the next request on that connection waited for the route's total timeout. Here the clients pause before reading
and read through a small receive buffer, so once the kernel's buffers are full (a few MB on loopback) the
gateway's relay, and then its upstream read, is held back; the stub writes each stream in one go, so the answer's
end often arrives in the read that crosses PAUSE_AT (about half the rounds of 3-5.5 MB here). Every answer
must come whole (every token, then ``[DONE]``), and none may take longer than its client's pauses plus a margin
(the total timeout is set far above that margin, so a stuck connection shows).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import h11
import pytest

from tests.processes import start_gateway, start_stub

TOKENS = (2000, 36000)  # about 0.3-5.5 MB of SSE from the stub (155 bytes a token), drawn each round
ROUNDS = 6
CLIENTS = 2
MARGIN_S = 4.0  # a loaded 2-core machine; the total timeout below is 30 s
ROUTES = """
routes:
  long:
    base_model: bulk  # the stub writes the stream in one go: it reaches the gateway faster than it is relayed
    variants: [{name: base, weight: 1}]
    timeouts: {total_s: 30, first_token_s: 30}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    directory = tmp_path_factory.mktemp("long")
    stub, stub_url = start_stub(directory / "stub.log")
    (directory / "routes.yaml").write_text(ROUTES)
    try:
        service, url = start_gateway(
            directory / "routes.yaml",
            [stub_url],
            directory / "gateway.log",
            extra_env={"LORAGATE_UPSTREAM_CLIENT": "lean"},
        )
        try:
            yield url
        finally:
            service.stop()
        assert "Traceback" not in (directory / "gateway.log").read_text()
    finally:
        stub.stop()


async def slow_client(url: str, rng: random.Random, report: list[tuple[int, float, float]]) -> None:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # backpressure reaches the gateway soon
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    connection = h11.Connection(h11.CLIENT)
    try:
        for _ in range(ROUNDS):
            tokens = rng.randrange(*TOKENS)
            body = json.dumps(
                {"model": "long", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": tokens}
            ).encode()
            writer.write(
                connection.send(
                    h11.Request(
                        method="POST",
                        target="/v1/chat/completions",
                        headers=[
                            ("host", host),
                            ("content-type", "application/json"),
                            ("content-length", str(len(body))),
                        ],
                    )
                )
            )
            writer.write(connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage()))
            started = time.perf_counter()
            paused = rng.uniform(0.1, 0.3)
            await asyncio.sleep(paused)  # a slow mobile client: nothing read for a while
            received, status = [], 0
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    if rng.random() < 0.05:  # and pauses again at random points
                        pause = rng.uniform(0, 0.05)
                        paused += pause
                        await asyncio.sleep(pause)
                    connection.receive_data(await reader.read(rng.choice([512, 4096, 65536])))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    received.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise AssertionError("the gateway closed the connection mid-answer")
            took = time.perf_counter() - started
            stream = b"".join(received)
            assert status == 200
            assert stream.endswith(b"data: [DONE]\n\n"), stream[-200:]
            assert stream.count(b'"content":"t') == tokens, "every token, once"
            report.append((len(stream), took, paused))
            connection.start_next_cycle()
    finally:
        writer.close()


def test_long_streams_read_slowly_over_keep_alive(gateway: str) -> None:
    report: list[tuple[int, float, float]] = []

    async def main() -> None:
        await asyncio.gather(*(slow_client(gateway, random.Random(seed), report) for seed in range(CLIENTS)))

    asyncio.run(main())
    assert len(report) == ROUNDS * CLIENTS
    assert min(size for size, _took, _paused in report) >= 300 * 1024
    late = [(round(took, 2), round(paused, 2)) for _size, took, paused in report if took > paused + MARGIN_S]
    assert not late, f"answers slower than their pauses plus {MARGIN_S} s: {late}"
