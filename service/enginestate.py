"""What one vLLM replica says about itself on ``/metrics``, read into an ``EngineState``.

The picker needs a handful of series from the engine's Prometheus text: requests running and
waiting, KV-cache usage, prefix-cache queries and hits, and ``vllm:lora_requests_info``, a gauge
whose value is a timestamp and whose labels name the adapters running and waiting and the LoRA
slots (``max_lora``); old series of it are never removed, so the newest one is read.

The body is upstream bytes: it is read up to ``MAX_METRICS_BYTES`` and searched with
``bytes.find`` for each wanted series at a line start (linear in its size, C speed, no regex);
label sets are parsed by one left-to-right pass. The worst body of ``MAX_METRICS_BYTES`` takes
~0.2 s (tests/unit/test_enginestate.py), so the replica set parses in a worker thread. A series the
engine does not expose stays None,
and the picker falls back to the gateway's own in-flight counts for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_METRICS_BYTES = 1 << 20  # a vLLM /metrics body is well under this (measured: docs/scheduling.md)
MAX_LABELS_BYTES = 64 << 10  # one series' label set (adapter lists included)

RUNNING = b"vllm:num_requests_running"
WAITING = b"vllm:num_requests_waiting"
KV_USAGE = b"vllm:kv_cache_usage_perc"
KV_USAGE_OLD = b"vllm:gpu_cache_usage_perc"  # before vLLM 0.10
PREFIX_QUERIES = b"vllm:prefix_cache_queries_total"
PREFIX_HITS = b"vllm:prefix_cache_hits_total"
LORA_INFO = b"vllm:lora_requests_info"


@dataclass(slots=True)
class EngineState:
    """One scrape of a replica. None: the engine did not expose that series."""

    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None  # 0..1
    prefix_queries: float | None = None  # tokens queried, a counter
    prefix_hits: float | None = None  # tokens hit, a counter
    max_lora: int | None = None  # LoRA slots on the accelerator (--max-loras)
    running_adapters: frozenset[str] | None = None
    waiting_adapters: frozenset[str] | None = None
    missing: tuple[str, ...] = field(default=())
    # Adapters with requests running or waiting on the engine (in its LoRA slots, or about to be).
    active_adapters: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        self.active_adapters = (self.running_adapters or frozenset()) | (self.waiting_adapters or frozenset())


class MetricsFormatError(ValueError):
    """The body is not Prometheus text we can read (too big, a broken label set)."""


def parse_labels(text: bytes, start: int) -> tuple[dict[str, str], int]:
    """The label set ``{k="v",...}`` at ``text[start] == b"{"``; returns it and the index after ``}``.

    One pass, each byte looked at once; escapes ``\\\\``, ``\\"`` and ``\\n`` as Prometheus writes them.
    """
    labels: dict[str, str] = {}
    end = min(len(text), start + MAX_LABELS_BYTES)
    i = start + 1
    while i < end:
        if text[i] == 0x7D:  # }
            return labels, i + 1
        if text[i] in b", ":
            i += 1
            continue
        eq = text.find(b"=", i, end)
        if eq < 0 or eq + 1 >= end or text[eq + 1] != 0x22:  # "
            raise MetricsFormatError("a label without a quoted value")
        name = text[i:eq].decode("ascii", "replace")
        i = eq + 2
        parts: list[bytes] = []
        while True:
            quote = text.find(b'"', i, end)
            slash = text.find(b"\\", i, quote if quote >= 0 else end)
            if quote < 0:
                raise MetricsFormatError("an unterminated label value")
            if slash < 0:
                parts.append(text[i:quote])
                i = quote + 1
                break
            parts.append(text[i:slash])
            escaped = text[slash + 1 : slash + 2]
            parts.append(b"\n" if escaped == b"n" else escaped)
            i = slash + 2
        labels[name] = b"".join(parts).decode("utf-8", "replace")
    raise MetricsFormatError("an unterminated label set")


def _samples(text: bytes, name: bytes) -> list[tuple[int, float]]:
    """(label start or -1, value) of every sample of series ``name`` (at a line start)."""
    found: list[tuple[int, float]] = []
    needle = b"\n" + name
    at = 0 if text.startswith(name) else text.find(needle)
    while at >= 0:
        begin = at if at == 0 and text.startswith(name) else at + 1
        after = begin + len(name)
        nxt = text[after : after + 1]
        line_end = text.find(b"\n", after)
        line_end = len(text) if line_end < 0 else line_end
        labels_at = -1
        if nxt == b"{":
            labels_at = after
            close = _label_end(text, after, line_end)
            value_text = text[close:line_end]
        elif nxt == b" ":
            value_text = text[after:line_end]
        else:  # another series whose name starts with this one (e.g. _by_reason)
            at = text.find(needle, after)
            continue
        fields = value_text.split()
        if fields:
            try:
                found.append((labels_at, float(fields[0])))
            except ValueError:
                pass
        at = text.find(needle, line_end)
    return found


def _label_end(text: bytes, start: int, line_end: int) -> int:
    """Index after the ``}`` closing the label set at ``start``; the quotes decide, not the braces.

    Each ``find`` stops at the next quote, so every byte is scanned about once (C speed)."""
    i = start + 1
    while True:
        quote = text.find(b'"', i, line_end)
        brace = text.find(b"}", i, quote if quote >= 0 else line_end)
        if brace >= 0:
            return brace + 1
        if quote < 0:
            raise MetricsFormatError("a label set without its closing brace")
        i = quote + 1
        while True:  # to the closing quote: one not escaped by an odd run of backslashes
            close = text.find(b'"', i, line_end)
            if close < 0:
                raise MetricsFormatError("an unterminated label value")
            value = text[i:close]
            backslashes = len(value) - len(value.rstrip(b"\\"))
            i = close + 1
            if backslashes % 2 == 0:
                break


def _sum(samples: list[tuple[int, float]]) -> float | None:
    return sum(value for _, value in samples) if samples else None


def _names(value: str | None) -> frozenset[str]:
    return frozenset(name for name in (value or "").split(",") if name)


def parse_engine_metrics(text: bytes) -> EngineState:
    """An EngineState from a vLLM ``/metrics`` body (several engines of one server are summed)."""
    if len(text) > MAX_METRICS_BYTES:
        raise MetricsFormatError(f"a /metrics body over {MAX_METRICS_BYTES} bytes")
    state = EngineState()
    missing: list[str] = []
    state.running = _sum(_samples(text, RUNNING))
    state.waiting = _sum(_samples(text, WAITING))
    kv = _samples(text, KV_USAGE) or _samples(text, KV_USAGE_OLD)
    state.kv_usage = max(value for _, value in kv) if kv else None
    state.prefix_queries = _sum(_samples(text, PREFIX_QUERIES))
    state.prefix_hits = _sum(_samples(text, PREFIX_HITS))
    info = [(at, value) for at, value in _samples(text, LORA_INFO) if at >= 0]
    if info:
        newest = max(info, key=lambda sample: sample[1])[0]  # the value is the time it was set
        labels, _ = parse_labels(text, newest)
        try:
            state.max_lora = int(labels.get("max_lora", ""))
        except ValueError:
            state.max_lora = None
        state.running_adapters = _names(labels.get("running_lora_adapters"))
        state.waiting_adapters = _names(labels.get("waiting_lora_adapters"))
        state.active_adapters = state.running_adapters | state.waiting_adapters
    for label, value in (
        ("running", state.running),
        ("waiting", state.waiting),
        ("kv_usage", state.kv_usage),
        ("prefix_cache", state.prefix_hits),
        ("lora_info", state.running_adapters),
    ):
        if value is None:
            missing.append(label)
    state.missing = tuple(missing)
    return state
