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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

VIRTUAL_NODES = 64  # points on the ring per replica: the share each gets is within a few % of 1/N
PREFIX_CHARS = 256  # how much of the prompt's beginning the key covers (of a chat: of its system prompt, first turn)
MAX_WALK = 32  # ring points looked at for a home
MIN_PREFIX_CHARS = 64  # shorter prompts have no affinity: about one KV-cache block (16 tokens), nothing to reuse


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def prefix_key(adapter: str | None, prefix: str) -> int:
    """The ring position of a prompt beginning (per adapter: the engine's prefix cache is per adapter)."""
    return _point(f"{adapter or ''}\x00{prefix[:PREFIX_CHARS]}")


class PrefixRing(Generic[T]):
    def __init__(self, members: Sequence[T], name: Callable[[T], str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        points = sorted(
            (_point(f"{name(m)}#{i}"), index) for index, m in enumerate(members) for i in range(virtual_nodes)
        )
        self.members = list(members)
        self._points = [p for p, _ in points]
        self._owners = [self.members[i] for _, i in points]

    def __len__(self) -> int:
        return len(self.members)

    def home(self, key: int, fits: Callable[[T], bool]) -> T | None:
        """The first member clockwise from ``key`` that ``fits`` (is usable and within its load bound), looking at
        most ``MAX_WALK`` points on: the cost stays bounded when most replicas are over the bound."""
        owners = self._owners
        if not owners:
            return None
        n = len(owners)
        start = bisect.bisect(self._points, key)
        for step in range(min(n, MAX_WALK)):
            member = owners[(start + step) % n]
            if fits(member):
                return member
        return None  # the neighbourhood is full: no home, the other scorers decide


class PrefixMemory(Generic[T]):
    """Where each prefix key was sent lately: the replicas whose prefix caches likely hold it.

    A hot prefix that spilled past its home's load bound is cached on the replica it spilled to as
    well; remembering that lets the next request use either. Bounded: ``keys`` keys (least recently
    used go first), the last ``per_key`` replicas of each.
    """

    def __init__(self, keys: int = 16384, per_key: int = 3) -> None:
        self.keys, self.per_key = keys, per_key
        self._seen: OrderedDict[int, list[T]] = OrderedDict()

    def get(self, key: int) -> list[T]:
        return self._seen.get(key, [])

    def record(self, key: int, member: T) -> None:
        members = self._seen.get(key)
        if members is None:
            self._seen[key] = [member]
            if len(self._seen) > self.keys:
                self._seen.popitem(last=False)
            return
        self._seen.move_to_end(key)
        if member in members:
            members.remove(member)
        members.append(member)
        if len(members) > self.per_key:
            del members[0]

    def forget(self, member: T) -> None:
        """A replica left: it holds nothing any more."""
        for key in [k for k, members in self._seen.items() if member in members]:
            self._seen[key].remove(member)


def load_bound(total_load: float, members: int, c: float = 1.25, slack: float = 4.0) -> float:
    """The most load a member may hold and still take a key: ``c`` times the mean, counting this request, plus
    ``slack`` requests (an engine batches: at a light load, being a few requests over the mean costs nothing,
    and a conversation that moves loses its cached turns)."""
    return c * (total_load + 1) / max(1, members) + slack


def _text(content: object) -> str:
    if isinstance(content, str):
        return content[:PREFIX_CHARS]
    if isinstance(content, list):  # parts: their text, up to PREFIX_CHARS
        texts: list[str] = []
        size = 0
        for part in content:
            if size >= PREFIX_CHARS:
                break
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"][: PREFIX_CHARS - size])
                size += len(texts[-1])
        return "".join(texts)
    return ""


def prompt_prefix(payload: dict) -> str | None:
    """What a request's prompt begins with, as far as affinity goes; None when shorter than ``MIN_PREFIX_CHARS``.

    A chat: the first ``PREFIX_CHARS`` of its system prompt and first turn. Every later turn of a
    conversation begins with both, so a conversation keeps its key (and its replica, where its earlier
    turns are cached). A long system prompt fills the key alone: every conversation on it meets on one
    replica (and spills to the next ones on the ring past the load bound), so the replicas share out the
    system prompts instead of each caching all of them. A completion: its prompt's first ``PREFIX_CHARS``.
    Reads no further than that.
    """
    messages = payload.get("messages")
    if isinstance(messages, list):
        system: list[str] = []
        first = ""
        for message in messages[:64]:
            if not isinstance(message, dict):
                break
            if message.get("role") in ("system", "developer"):
                system.append(_text(message.get("content")))
                continue
            first = _text(message.get("content"))
            break
        text = ("\x1e".join(system) + "\x1e" + first)[:PREFIX_CHARS]
        return text if len(text) > MIN_PREFIX_CHARS else None
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt[:PREFIX_CHARS] if isinstance(prompt, str) and len(prompt) >= MIN_PREFIX_CHARS else None
