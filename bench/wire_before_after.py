"""Each wire defect of issue 26, on another git ref's clients (default main) and on this checkout's, in one run.

Loads the ref's service/httpclient.py and service/resp.py as modules (bench/gitref.py) and plays the same scripted
loopback servers (tests/wire_peers.py) to both; prints each outcome (with the client's CPU and wall time where it
matters) and writes bench/results/wire_before_after.json. Run: .venv/bin/python bench/wire_before_after.py [REF]
"""

import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.gitref import module_at  # noqa: E402
from loragate.service import httpclient as NH  # noqa: E402
from loragate.service import resp as NR  # noqa: E402
from loragate.service.transport import Timeout  # noqa: E402
from tests.wire_peers import HttpPeer  # noqa: E402

REF = sys.argv[1] if len(sys.argv) > 1 else "main"
OH = module_at(REF, "service/httpclient.py", "httpclient_at_ref")
OR = module_at(REF, "service/resp.py", "resp_at_ref")
RESULTS: dict[str, dict[str, object]] = {}


def note(name: str, before: object, after: object) -> None:
    RESULTS[name] = {REF: repr(before), "this checkout": repr(after)}
    print(f"{name}: {REF} {before!r} | this checkout {after!r}", flush=True)


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def outcome(kind, script, timeout_s=3.0):
    peer = HttpPeer(lambda n: script if n == 0 else [OK])
    async with peer.running() as url:
        if kind == "old":  # the ref's client took aiohttp's timeouts
            c = OH.HttpClient(aiohttp.ClientTimeout(total=timeout_s))
            t = aiohttp.ClientTimeout(total=timeout_s)
        else:
            c = NH.HttpClient(Timeout(total=timeout_s))
            t = Timeout(total=timeout_s)
        t0 = time.thread_time()
        w0 = time.perf_counter()
        try:
            r = await c.post(url, b"{}", request_id="r", timeout=t)
            out = (r.status, (await r.read())[:20])
        except Exception as e:
            out = type(e).__name__
        cpu = time.thread_time() - t0
        wall = time.perf_counter() - w0
        await c.close()
        return out, round(cpu, 3), round(wall, 3)


big = [b"HTTP/1.1 200 OK\r\nx-big: "] + [b"x" * 65536] * 256 + [b"\r\ncontent-length: 2\r\n\r\nok"]
cases = {
    "100 then 200": [b"HTTP/1.1 100 Continue\r\n\r\n", 0.01, OK],
    "103 then 200": [b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + OK],
    "status 999": [b"HTTP/1.1 999 X\r\ncontent-length: 0\r\n\r\n"],
    "status 000": [b"HTTP/1.1 000 X\r\ncontent-length: 0\r\n\r\n"],
    "16 MB header in 64 KB writes": big,
    "TE identity until close": [b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\nas is", "close"],
    "TE gzip": [b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzz", "close"],
}


async def http():
    for name, script in cases.items():
        note(f"HTTP {name} (outcome, client CPU s, wall s)", await outcome("old", script), await outcome("new", script))


asyncio.run(http())


async def paused_pool(kind):
    """A long answer whose end arrives in the read that crosses PAUSE_AT, read after a pause; then one more request
    on the kept connection (2 s total timeout)."""
    size = OH.PAUSE_AT + 100_000
    peer = HttpPeer(
        lambda n: [b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size] if n == 0 else [OK]
    )
    async with peer.running() as url:
        if kind == "old":
            c, t = OH.HttpClient(), aiohttp.ClientTimeout(total=2)
        else:
            c, t = NH.HttpClient(), Timeout(total=2)
        r = await c.post(url, b"{}", request_id="r", timeout=t)
        await asyncio.sleep(0.1)  # a slow reader: the whole answer is in before the first read
        got = sum([len(chunk) async for chunk in r.content.iter_any()])
        r.release()
        started = time.perf_counter()
        try:
            r = await c.post(url, b"{}", request_id="r", timeout=t)
            out = (r.status, await r.read())
        except Exception as e:
            out = type(e).__name__
        await c.close()
        return got == size, out, round(time.perf_counter() - started, 3)


async def pool():
    note(
        "HTTP the request after a long answer read slowly (whole?, outcome, wall s)",
        await paused_pool("old"),
        await paused_pool("new"),
    )


asyncio.run(pool())


def old_parse_all(data):
    out, pos = [], 0
    try:
        while (p := OR.parse(data, pos)) is not None:
            v, pos = p
            out.append(v)
    except BaseException as e:
        return type(e).__name__
    return out


def new_parse_all(data):
    r = NR.RespReader()
    out = []
    try:
        r.feed(data)
        while (v := r.gets()) is not False:
            out.append(v)
    except BaseException as e:
        return type(e).__name__
    return out


HOSTILE_REPLIES = {"$3 abcXY": b"$3\r\nabcXY", ":1_000": b":1_000\r\n", "nested 100000": b"*1\r\n" * 100000 + b":1\r\n"}
for name, data in HOSTILE_REPLIES.items():
    note(f"RESP {name}", str(old_parse_all(data))[:40], str(new_parse_all(data))[:40])
# large incomplete array in 4 KB reads: the old protocol re-parses from the start on every read
n = 100000
data = b"*%d\r\n" % n + b":1\r\n" * n


async def feed_proto(mod):
    p = mod._Protocol(5.0) if mod is OR else mod._Protocol(5.0, NR.RespReader())
    p.transport = None
    f = p.send(b"x")
    p.outgoing.clear()
    longest = 0
    t0 = time.thread_time()
    for i in range(0, len(data), 4096):
        s = time.thread_time()
        p.data_received(data[i : i + 4096])
        longest = max(longest, time.thread_time() - s)
    total = time.thread_time() - t0
    assert f.done() and len(f.result()) == n
    if p._timer:
        p._timer.cancel()
    return round(total, 3), round(longest, 4)


async def arr():
    note(
        "RESP 100k-element array in 4 KB reads (CPU s in all, longest read s)",
        await feed_proto(OR),
        await feed_proto(NR),
    )


asyncio.run(arr())


# unsolicited reply
async def unsolicited(mod):
    state = {"n": 0}

    async def serve(reader, writer):
        try:
            while True:
                line = await reader.readuntil(b"\r\n")
                count = int(line[1:-2])
                parts = []
                for _ in range(count):
                    size = int((await reader.readuntil(b"\r\n"))[1:-2])
                    parts.append((await reader.readexactly(size + 2))[:-2])
                if state["n"] == 0:
                    writer.write(b"+PONG\r\n+EXTRA\r\n")
                else:
                    writer.write(b"$%d\r\n%s\r\n" % (len(parts[1]), parts[1]))
                state["n"] += 1
        except BaseException:
            pass

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    c = mod.RespClient(f"redis://127.0.0.1:{srv.sockets[0].getsockname()[1]}/0", timeout_s=0.5)
    first = await c.call("PING")
    await asyncio.sleep(0.05)
    got = []
    for i in range(3):
        try:
            got.append(await c.call("ECHO", f"n{i}"))
        except Exception as e:
            got.append(type(e).__name__)
    await c.close()
    srv.close()
    return first, got


async def uns():
    note("RESP +EXTRA after PING's reply, then ECHO n0, n1, n2", await unsolicited(OR), await unsolicited(NR))


asyncio.run(uns())

out = ROOT / "bench" / "results" / "wire_before_after.json"
out.write_text(
    json.dumps(
        {
            "what": "issue 26's wire defects on the ref's clients and this checkout's",
            "ref": REF,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "results": RESULTS,
        },
        indent=1,
    )
    + "\n"
)
print(f"wrote {out}")
