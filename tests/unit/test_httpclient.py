"""The lean upstream client (service/httpclient.py) against real servers on loopback.

The STUB upstream (tests/stub_upstream.py, aiohttp, in this process) for what vLLM's API looks like;
a raw asyncio server (``Raw``) for what only a misbehaving peer does: answers scripted byte by byte,
connections counted and closed on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest

from loragate.service.failures import FailureReason, UpstreamFailure
from loragate.service.httpclient import PAUSE_AT, HttpClient
from loragate.service.proxy import HttpUpstream, open_upstream
from loragate.service.transport import ConnectFailed, IncompleteAnswer, MalformedAnswer, Timeout, TransportTimeout
from tests.local_http import serve
from tests.processes import free_port
from tests.stub_upstream import make_app

JSON_OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def chat(**extra: object) -> bytes:
    return orjson.dumps({**CHAT, **extra})


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


class Raw:
    """A raw HTTP/1.1 peer: ``answer(reader, writer, request)`` writes the bytes; False closes the connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.answer(reader, writer, request):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
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


async def reply(writer: asyncio.StreamWriter, *parts: bytes, pause_s: float = 0.0) -> None:
    for part in parts:
        writer.write(part)
        await writer.drain()
        if pause_s:
            await asyncio.sleep(pause_s)


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    client = HttpClient(Timeout(total=5, connect=2))
    yield client
    await client.close()


async def test_json_sse_and_statuses_through_the_stub(client: HttpClient) -> None:
    async with serve(make_app(chunks=16)) as port:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        response = await client.post(url, chat(), request_id="r-1", api_key="sk-1")
        answer = orjson.loads(await response.read())
        assert response.status == 200 and answer["usage"]["completion_tokens"] == 4
        response.release()

        # SSE (chunked): the events as they come, then the end.
        response = await client.post(
            url, chat(stream=True, max_tokens=16, stream_options={"include_usage": True}), request_id="r-2"
        )
        assert response.status == 200
        first = await response.content.readany()
        assert first.startswith(b"data: {")
        rest = [chunk async for chunk in response.content.iter_any()]
        events = (first + b"".join(rest)).split(b"\n\n")
        assert events[-2:] == [b"data: [DONE]", b""] and len(events) == 16 + 1 + 1 + 1
        response.release()

        assert len(client.idle[("127.0.0.1", port)]) == 1, "one kept-alive connection served both"

        upstream = HttpUpstream()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/stub/stats") as got:
                stats = await got.json()
            assert stats["requests"] == 2 and stats["last_authorization"] is None  # the second had no key
            # 4xx of the client's making come back as they are; 5xx, 429 and an adapter's 404 are failures.
            upstream.bind(session, client)
            missing = await upstream(f"http://127.0.0.1:{port}/v1/nowhere", chat(), request_id="r-4", is_adapter=False)
            assert missing.status == 404
            missing.release()
            for model, is_adapter, path, reason in [
                ("fail-500", False, "chat/completions", "upstream_5xx"),
                ("fail-429", False, "chat/completions", "upstream_429"),
                ("base", True, "nowhere", "adapter_missing"),
            ]:
                with pytest.raises(UpstreamFailure) as failure:
                    await upstream(
                        f"http://127.0.0.1:{port}/v1/{path}", chat(model=model), request_id="r-5", is_adapter=is_adapter
                    )
                assert failure.value.reason == reason


async def test_keep_alive_reuse_idle_close_and_connection_close(client: HttpClient) -> None:
    closing = {"after": False, "header": False}

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _request: bytes) -> bool:
        if closing["header"]:
            await reply(writer, JSON_OK.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n"))
            return True  # the client must not send another request on it anyway
        await reply(writer, JSON_OK)
        return not closing["after"]

    raw = Raw(answer)
    async with raw.running() as url:
        for _ in range(3):
            response = await client.post(url + "/v1/completions", b"{}", request_id="a")
            assert await response.read() == b'{"ok":true}'
        assert raw.connections == 1, "one connection, kept alive"

        closing["after"] = True  # the server closes the connection after this answer (its idle timeout, say)
        assert await (await client.post(url + "/v1/completions", b"{}", request_id="b")).read() == b'{"ok":true}'
        await asyncio.sleep(0.05)
        closing["after"] = False
        assert await (await client.post(url + "/v1/completions", b"{}", request_id="c")).read() == b'{"ok":true}'
        assert raw.connections == 2

        closing["header"] = True
        for _ in range(2):
            assert await (await client.post(url + "/v1/completions", b"{}", request_id="d")).read()
        assert raw.connections == 3 and not client.idle[response_key(url)], "`connection: close`: not reused"


async def test_a_kept_alive_connection_closed_under_a_request_is_retried_once_on_a_fresh_one(
    client: HttpClient,
) -> None:
    drop_next = {"on": False}

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _request: bytes) -> bool:
        if drop_next["on"]:
            drop_next["on"] = False
            return False  # took the request, answered nothing: the race with a server's idle timeout
        await reply(writer, JSON_OK)
        return True

    raw = Raw(answer)
    async with raw.running() as url:
        assert await (await client.post(url + "/v1/completions", b"{}", request_id="a")).read()
        drop_next["on"] = True
        response = await client.post(url + "/v1/completions", b"{}", request_id="b")
        assert response.status == 200 and await response.read() == b'{"ok":true}'
        assert raw.connections == 2 and len(raw.requests) == 3

    # On a fresh connection the same drop is the replica's answer: disconnected, not retried.
    async with serve(make_app()) as port:
        with pytest.raises(UpstreamFailure) as failure:
            await open_upstream(
                client,
                f"http://127.0.0.1:{port}/v1/chat/completions",
                chat(model="reset"),
                request_id="c",
                is_adapter=False,
            )
        assert failure.value.reason == FailureReason.DISCONNECTED


@pytest.mark.parametrize(
    "head, body, expected",
    [
        (b"content-length: 20\r\n", [b"0123456789"], IncompleteAnswer),
        (b"transfer-encoding: chunked\r\n", [b"5\r\nhello\r\n", b"3\r\nab"], IncompleteAnswer),
        (b"", [b"until ", b"the close"], None),  # neither length nor chunks: the body runs until the close
    ],
)
async def test_server_closing_mid_body(
    client: HttpClient, head: bytes, body: list[bytes], expected: type[Exception] | None
) -> None:
    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _request: bytes) -> bool:
        await reply(writer, b"HTTP/1.1 200 OK\r\n" + head + b"\r\n", *body, pause_s=0.02)
        return False

    async with Raw(answer).running() as url:
        response = await client.post(url + "/v1/completions", b"{}", request_id="a")
        if expected is None:
            assert await response.read() == b"until the close"
        else:
            with pytest.raises(expected):
                await response.read()


async def test_chunks_are_read_as_they_come_with_backpressure(client: HttpClient) -> None:
    gate = asyncio.Event()
    big = b"x" * (4 * PAUSE_AT)

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
        await reply(writer, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", b"6\r\nfirst \r\n")
        await gate.wait()  # the second piece only once the client has the first
        await reply(writer, b"%x\r\n%s\r\n" % (len(big), big), b"0\r\n\r\n")
        return True

    raw = Raw(answer)
    async with raw.running() as url:
        response = await client.post(url + "/v1/completions", b"{}", request_id="a")
        assert await response.content.readany() == b"first "
        gate.set()
        while response.size <= PAUSE_AT:
            await asyncio.sleep(0.01)
        assert response.paused, "reading from the socket stops while the reader is behind"
        received = b"".join([chunk async for chunk in response.content.iter_any()])
        assert received == big and not response.paused
        assert raw.connections == 1 and len(client.idle[response_key(url)]) == 1, "a whole answer frees its connection"


def response_key(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def test_release_of_an_unfinished_answer_closes_its_connection(client: HttpClient) -> None:
    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _request: bytes) -> bool:
        await reply(writer, b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
        await asyncio.sleep(0.2)
        await reply(writer, b"56789")
        return True

    raw = Raw(answer)
    async with raw.running() as url:
        response = await client.post(url + "/v1/completions", b"{}", request_id="a")
        assert await response.content.readany() == b"01234"
        response.release()
        response = await client.post(url + "/v1/completions", b"{}", request_id="b")
        assert await response.read() == b"0123456789"
        assert raw.connections == 2, "the released half-read connection was not reused"


async def test_connect_refused_and_malformed_answers(client: HttpClient) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/completions"
    with pytest.raises(ConnectFailed) as refused:
        await client.post(url, b"{}", request_id="a")
    assert isinstance(refused.value.os_error, ConnectionRefusedError)
    with pytest.raises(UpstreamFailure) as failure:
        await open_upstream(client, url, b"{}", request_id="a", is_adapter=False)
    assert failure.value.reason == FailureReason.CONNECT_ERROR

    async def garbage(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _request: bytes) -> bool:
        await reply(writer, b"SPDY/9 lol\r\n\r\n")
        return True

    async with Raw(garbage).running() as url:
        with pytest.raises(MalformedAnswer):
            await client.post(url + "/v1/completions", b"{}", request_id="a")
        with pytest.raises(UpstreamFailure) as failure:
            await open_upstream(client, url + "/v1/completions", b"{}", request_id="a", is_adapter=False)
        assert failure.value.reason == FailureReason.UPSTREAM_ERROR


async def test_timeouts(client: HttpClient) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
        if b"stall" in request:
            await reply(writer, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", b"8\r\ndata: 1\n\r\n")
        elif b"half" in request:
            await reply(writer, b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"id": ')
        await reader.read()  # then silence, until the client gives up and closes
        return False

    async with Raw(answer).running() as url:
        url += "/v1/chat/completions"
        # sock_read: the first token's timeout for streams (here: no byte at all)
        started = time.perf_counter()
        with pytest.raises(TransportTimeout):
            await client.post(url, b"{}", request_id="a", timeout=Timeout(total=5, read=0.2))
        assert time.perf_counter() - started < 1
        # sock_read is the longest silence: a stream that stalls after its first event times out mid-way
        response = await client.post(url, b'"stall"', request_id="b", timeout=Timeout(total=5, read=0.2))
        assert await response.content.readany() == b"data: 1\n"
        with pytest.raises(TransportTimeout):
            await response.content.readany()
        # total: the whole exchange, reading the body included (headers and a bit of the body, then nothing)
        started = time.perf_counter()
        response = await client.post(url, b'"half"', request_id="c", timeout=Timeout(total=0.3))
        assert response.status == 200
        with pytest.raises(TransportTimeout):
            await response.read()
        assert 0.25 < time.perf_counter() - started < 1
        with pytest.raises(UpstreamFailure) as failure:
            await open_upstream(client, url, b"{}", request_id="d", is_adapter=False, timeout=Timeout(total=0.2))
        assert failure.value.reason == FailureReason.TIMEOUT
        assert not client.idle.get(response_key(url.removesuffix("/v1/chat/completions"))), "none kept"


async def test_connect_timeout_is_a_timeout_not_a_refusal(client: HttpClient) -> None:
    with socket.socket() as listener, contextlib.ExitStack() as stack:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepts: once its queue is full, further connection attempts go unanswered
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        started = time.perf_counter()
        with pytest.raises(UpstreamFailure) as failure:
            await open_upstream(
                client,
                f"http://127.0.0.1:{port}/v1/completions",
                b"{}",
                request_id="a",
                is_adapter=False,
                timeout=Timeout(total=5, connect=0.2),
            )
        assert failure.value.reason == FailureReason.TIMEOUT and time.perf_counter() - started < 1


async def test_https_goes_through_the_aiohttp_session(client: HttpClient) -> None:
    class Recording:
        def __init__(self) -> None:
            self.urls: list[str] = []

        async def post(self, url: str, **_options: object) -> None:
            self.urls.append(url)
            raise aiohttp.ClientConnectionError("recorded")

    session, upstream = Recording(), HttpUpstream()
    upstream.bind(session, client)  # type: ignore[arg-type]
    with pytest.raises(UpstreamFailure):
        await upstream("https://api.example.com/v1/chat/completions", b"{}", request_id="a", is_adapter=False)
    with pytest.raises(UpstreamFailure) as failure:  # plain http: the lean client (nothing listens there)
        await upstream(f"http://127.0.0.1:{free_port()}/v1/chat/completions", b"{}", request_id="b", is_adapter=False)
    assert session.urls == ["https://api.example.com/v1/chat/completions"]
    assert failure.value.reason == FailureReason.CONNECT_ERROR
