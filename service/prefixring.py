"""Bounded-load consistent hashing of prompt prefixes onto replicas.

Requests that begin alike (one system prompt, the earlier turns of one conversation) should meet
on the replica whose prefix cache holds that beginning. A hash ring sends each prefix key to a
replica; with a load bound (Mirrokni, Thorup, Zadimoghaddam: "Consistent Hashing with Bounded
Loads") a replica already above ``c`` times the mean load passes the key on to the next one on the
ring, so one hot prefix spills over to a neighbour instead of overloading its replica. Adding or
removing a replica moves only the keys it takes or held.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

VIRTUAL_NODES = 64  # points on the ring per replica: the share each gets is within a few % of 1/N
PREFIX_CHARS = 256  # how much of the prompt's beginning the key covers
MIN_PREFIX_CHARS = 64  # shorter prompts have no affinity: about one KV-cache block (16 tokens), nothing to reuse


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def prefix_key(adapter: str | None, prefix: str) -> int:
    """The ring position of a prompt beginning (per adapter: the engine's prefix cache is per adapter)."""
    return _point(f"{adapter or ''}\x00{prefix[:PREFIX_CHARS]}")


class PrefixRing(Generic[T]):
    def __init__(self, members: Sequence[T], name: Callable[[T], str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        points = sorted((_point(f"{name(m)}#{i}"), index) for index, m in enumerate(members)
                        for i in range(virtual_nodes))
        self.members = list(members)
        self._points = [p for p, _ in points]
        self._owners = [self.members[i] for _, i in points]

    def __len__(self) -> int:
        return len(self.members)

    def home(self, key: int, fits: Callable[[T], bool]) -> T | None:
        """The first member clockwise from ``key`` that ``fits`` (is usable and within its load bound)."""
        owners = self._owners
        if not owners:
            return None
        start = bisect.bisect(self._points, key) % len(owners)
        seen: set[int] = set()
        n = len(owners)
        for step in range(n):
            member = owners[(start + step) % n]
            if fits(member):
                return member
            seen.add(id(member))
            if len(seen) == len(self.members):
                break
        return None


def load_bound(total_load: float, members: int, c: float = 1.25) -> float:
    """The most load a member may hold and still take a key: ``c`` times the mean, counting this request."""
    return c * (total_load + 1) / max(1, members)


def prompt_prefix(payload: dict) -> str | None:
    """The prompt's first ``PREFIX_CHARS`` characters: a chat's system prompt and first turn (their text
    parts; every later turn of the conversation begins with them, so a conversation keeps its key), or a
    completion's prompt; None when it is shorter than ``MIN_PREFIX_CHARS``. Reads no further."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            if isinstance(content, str):
                parts.append(content[:PREFIX_CHARS - size])
                size += len(parts[-1])
                if size >= PREFIX_CHARS:
                    break
            if not isinstance(message, dict) or message.get("role") not in ("system", "developer"):
                break  # the first turn: what every later turn of the conversation begins with too
        text = "\x1e".join(parts)
        return text if len(text) >= MIN_PREFIX_CHARS else None
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt[:PREFIX_CHARS] if isinstance(prompt, str) and len(prompt) >= MIN_PREFIX_CHARS else None
