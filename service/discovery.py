"""Upstream entries and the replicas they stand for.

An entry of ``LORAGATE_UPSTREAMS`` with an IP address (``http://10.0.0.7:8000``) is one replica.
An ``http://`` entry with a host name (``http://vllm-engine:8000``, the chart's headless Service)
stands for every address the name resolves to (A and AAAA records, through the event loop's
getaddrinfo, so /etc/hosts and the cluster DNS both count), re-resolved at every health interval.
``https://`` entries keep their name: TLS checks the certificate against it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


class DiscoveryError(RuntimeError):
    """A host name of an upstream entry did not resolve; the message names the entry."""


@dataclass(frozen=True, slots=True)
class Entry:
    url: str  # as configured (its metric label)
    scheme: str
    host: str
    port: int
    path: str
    discovered: bool  # a host name whose addresses are the replicas

    def replica_url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_entry(url: str) -> Entry:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ipaddress.ip_address(host)
        is_name = False
    except ValueError:
        is_name = True
    return Entry(url, parts.scheme, host, port, parts.path.rstrip("/"), is_name and parts.scheme == "http")


def _addresses(infos: list) -> list[str]:
    return sorted({info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)})


async def resolve(entry: Entry) -> list[str]:
    """The addresses of ``entry``'s host now (DiscoveryError when it does not resolve)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(entry.host, entry.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise DiscoveryError(f"upstream {entry.url}: host {entry.host!r} does not resolve ({exc})") from None
    addresses = _addresses(infos)
    if not addresses:
        raise DiscoveryError(f"upstream {entry.url}: host {entry.host!r} has no IPv4 or IPv6 address")
    return addresses


def wait_until_resolved(urls: list[str], timeout_s: float, poll_s: float = 1.0) -> None:
    """At start: every host name of ``urls`` must resolve within ``timeout_s`` (DiscoveryError names the
    first that does not). A freshly started engine may take a moment to appear in DNS."""
    deadline = time.monotonic() + timeout_s
    for entry in (parse_entry(url) for url in urls):
        if not entry.discovered:
            continue
        while True:
            try:
                if _addresses(socket.getaddrinfo(entry.host, entry.port, type=socket.SOCK_STREAM)):
                    break
                problem = "has no IPv4 or IPv6 address"
            except (OSError, UnicodeError) as exc:
                problem = f"does not resolve ({exc})"
            if time.monotonic() >= deadline:
                raise DiscoveryError(
                    f"upstream {entry.url}: host {entry.host!r} {problem} "
                    f"after {timeout_s:g} s (LORAGATE_DISCOVERY_START_TIMEOUT_S)"
                )
            time.sleep(poll_s)
