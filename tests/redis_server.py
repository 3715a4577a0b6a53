"""A real redis-server (Debian's package) on a free loopback port, stoppable and restartable on that port."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from tests.processes import Service, free_port


class RedisServer:
    def __init__(
        self, directory: Path, port: int | None = None, prefix: tuple[str, ...] = (), args: tuple[str, ...] = ()
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (apt-get install redis-server); scripts/setup.sh --test does it"
            )
        self.binary = binary
        self.prefix = prefix  # e.g. ("taskset", "-c", "0") to pin it
        self.args = args  # more redis-server options, e.g. ("--requirepass", "...")
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.service: Service | None = None

    def start(self) -> "RedisServer":
        self.service = Service(
            [
                *self.prefix,
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--protected-mode",
                "no",
                *self.args,
            ],
            self.directory / "redis.log",
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.service.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64)[:1] in (b"+", b"-"):  # PONG, or NOAUTH with a password: it answers
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("redis-server did not answer PING within 20 s")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None
