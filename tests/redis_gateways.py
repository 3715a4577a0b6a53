"""Gateway processes that share their limits and budgets through one real redis-server, over the STUB upstream.

``redis_gateways`` starts the redis-server (tests/redis_server.py), the stub, and ``count`` gateways with API keys on,
each key's YAML fields given; it yields the server, the gateways' URLs and their logs, stops them all, and fails if a
log holds a traceback. tests/integration/test_limits_redis.py and test_budgets_redis.py use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loragate.service.apikeys import hash_key
from tests.processes import start_gateway, start_stub
from tests.redis_server import RedisServer


@contextmanager
def redis_gateways(
    directory: Path, count: int, routes: str, keys: dict[str, tuple[str, str]], env: dict[str, str] | None = None
) -> Iterator[tuple[RedisServer, list[str], list[Path]]]:
    """``keys``: key id -> (the key, its other YAML fields, e.g. ``"requests_per_minute: 300"``)."""
    redis = RedisServer(directory).start()
    stub, stub_url = start_stub(directory / "stub.log")
    (directory / "routes.yaml").write_text(routes)
    (directory / "keys.yaml").write_text(
        "keys:\n"
        + "".join(f'  - {{id: {name}, sha256: "{hash_key(key)}", {fields}}}\n' for name, (key, fields) in keys.items())
    )
    gateways = []
    try:
        for index in range(count):
            gateways.append(
                start_gateway(
                    directory / "routes.yaml",
                    [stub_url],
                    directory / f"gateway-{index}.log",
                    extra_env={
                        "LORAGATE_AUTH": "on",
                        "LORAGATE_API_KEYS_FILE": str(directory / "keys.yaml"),
                        "LORAGATE_LIMITS_URL": redis.url,
                        **(env or {}),
                    },
                )
            )
        yield redis, [url for _, url in gateways], [service.log for service, _ in gateways]
    finally:
        logs = []
        for service, _ in gateways:
            service.stop()
            logs.append(service.log.read_text())
        stub.stop()
        redis.stop()
    for text in logs:
        assert "Traceback" not in text
