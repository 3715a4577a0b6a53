"""`loragate demo` checks its two ports before starting anything: a port held only by connections in
TIME_WAIT (the demo stopped a moment ago) is free, as it is for the servers that bind it (they set
SO_REUSEADDR); a port with a listener is in use, and the demo refuses with a message naming it."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from loragate.cli import _port_free, main


def _listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen()
    return sock


def _plain_bind_error(port: int) -> int | None:
    """The errno of a bind without SO_REUSEADDR (the old check), or None when it succeeds."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno
    return None


@pytest.fixture
def time_wait_port() -> Iterator[int]:
    """A port whose server closed an accepted connection first (so its side sits in TIME_WAIT for ~60 s),
    then stopped listening: what a stopped vLLM or gateway leaves behind."""
    server = _listener()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server's side closes first: it is the one that waits in TIME_WAIT
    client.recv(1)  # the FIN arrived
    client.close()
    server.close()
    yield port


def test_a_port_left_in_time_wait_is_free(time_wait_port: int) -> None:
    # The precondition the demo met: a plain bind is refused while the old connection waits.
    assert _plain_bind_error(time_wait_port) == errno.EADDRINUSE
    assert _port_free(time_wait_port)
    # ... and a server (SO_REUSEADDR, as uvicorn and vLLM bind) can indeed listen there now.
    _listener(port=time_wait_port).close()


def test_a_port_with_a_listener_is_in_use() -> None:
    with _listener() as server:
        assert not _port_free(server.getsockname()[1])
    with _listener("0.0.0.0") as server:  # listening on every address holds 127.0.0.1 too
        assert not _port_free(server.getsockname()[1])


def test_a_port_with_a_listener_and_time_wait_connections_is_in_use(time_wait_port: int) -> None:
    with _listener(port=time_wait_port):
        assert not _port_free(time_wait_port)


def test_demo_refuses_a_port_in_use_and_names_it(capsys: pytest.CaptureFixture[str], time_wait_port: int) -> None:
    with _listener() as server:
        port = server.getsockname()[1]
        assert main(["demo", "--port", str(time_wait_port), "--engine-port", str(port)]) == 1
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
