"""Shadow comparison: each shadow variant's answers against the primary answers of the same requests.

The gateway logs a shadow answer under its primary's request id with ``role=shadow``
(service/shadow.py, loragate.common.logschema). Over a window of the request log this pairs
them and reports, per shadow variant against one primary (the stable) variant:

* error rate of each side and their difference (an error: a status other than 200);
* latency ratio: median shadow latency / median primary latency (pairs both answered);
* length ratio: shadow completion tokens / primary completion tokens (text length without tokens);
* similarity: mean token-overlap F1 of the two answers (SQuAD's measure: bag of lower-cased word
  tokens; linear in the answer length, unlike ROUGE-L's quadratic LCS), and the identical-answer rate.

The noise floor (Diffy's idea: how much the stable variant differs from itself) comes from repeat
pairs: primary answers of the stable variant to the same prompt (same endpoint and prompt text)
within the window, taken two by two in time order. At temperature 0 the floor is ~1 (identical);
with sampling it is the similarity sampling alone explains. A shadow under the floor answers
differently from what the stable variant would; with no repeats in the window the floor is unknown.

``gate`` turns a comparison into pass / fail / insufficient_data for a ``shadow_gate`` before a
canary starts (monitoring/rollout/); ``loragate shadow report`` (monitoring/shadowcli.py) prints it.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import pandas as pd
    from prometheus_client import CollectorRegistry

    from loragate.monitoring.sources import RequestLog, Window

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def token_f1(a: str, b: str) -> float:
    """Token-overlap F1 of two texts (1.0 for two empty ones)."""
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return 1.0 if not ta and not tb else 0.0
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(tb), common / len(ta)
    return 2 * precision * recall / (precision + recall)


@dataclass
class NoiseFloor:
    pairs: int  # repeat pairs of the primary variant
    similarity: float | None
    identical_rate: float | None


@dataclass
class ShadowComparison:
    route: str
    variant: str  # the shadow variant
    primary: str | None  # the primary variant it is compared with
    pairs: int  # requests answered by both (paired by request id)
    answered_pairs: int  # ... both with status 200 and an answer text
    primary_error_rate: float | None
    shadow_error_rate: float | None
    error_rate_delta: float | None  # shadow - primary
    latency_ratio: float | None
    length_ratio: float | None
    similarity: float | None
    identical_rate: float | None
    noise_floor: NoiseFloor = field(default_factory=lambda: NoiseFloor(0, None, None))
    window_shadow_rows: int | None = None  # shadow answers in the window (``pairs`` come from a sample of them)

    @property
    def below_floor(self) -> bool | None:
        """Whether the shadow is less similar to the primary than the primary is to itself (None: unknown)."""
        if self.similarity is None or self.noise_floor.similarity is None:
            return None
        return self.similarity < self.noise_floor.similarity

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "below_floor": self.below_floor}


def compare(frame: "pd.DataFrame", route: str, variant: str, primary: str | None = None) -> ShadowComparison:
    """The comparison of ``variant``'s shadow answers on ``route`` in ``frame`` (requests rows, every role).

    ``primary``: the variant compared with (default: the one that answered most of the paired requests).
    """
    rows = frame[frame["route"] == route]
    shadows = rows[(rows["role"] == "shadow") & (rows["variant"] == variant)].drop_duplicates("request_id")
    primaries = rows[rows["role"] == "primary"].drop_duplicates("request_id")
    pairs = primaries.merge(shadows, on="request_id", suffixes=("_p", "_s"))
    if primary is None and len(pairs):
        primary = str(pairs["variant_p"].value_counts().idxmax())
    if primary is not None:
        pairs = pairs[pairs["variant_p"] == primary]
    floor = noise_floor(primaries[primaries["variant"] == primary]) if primary else NoiseFloor(0, None, None)
    n = len(pairs)
    if n == 0:
        return ShadowComparison(route, variant, primary, 0, 0, None, None, None, None, None, None, None, floor)
    p_err = float((pairs["status_p"] != 200).mean())
    s_err = float((pairs["status_s"] != 200).mean())
    ok = pairs[(pairs["status_p"] == 200) & (pairs["status_s"] == 200)]
    texts = ok[ok["response_text_p"].notna() & ok["response_text_s"].notna()]
    latency_ratio = length_ratio = similarity = identical = None
    if len(ok):
        p_lat = statistics.median(ok["latency_s_p"].astype(float))
        latency_ratio = statistics.median(ok["latency_s_s"].astype(float)) / p_lat if p_lat > 0 else None
        p_tok = float(ok["completion_tokens_p"].fillna(0).sum())
        s_tok = float(ok["completion_tokens_s"].fillna(0).sum())
        if p_tok > 0:
            length_ratio = s_tok / p_tok
    if len(texts):
        a, b = list(texts["response_text_p"]), list(texts["response_text_s"])
        similarity = statistics.fmean(token_f1(x, y) for x, y in zip(a, b))
        identical = statistics.fmean(1.0 if x.strip() == y.strip() else 0.0 for x, y in zip(a, b))
        if length_ratio is None:
            chars = sum(len(x) for x in a)
            length_ratio = sum(len(y) for y in b) / chars if chars else None
    return ShadowComparison(
        route,
        variant,
        primary,
        n,
        len(texts),
        p_err,
        s_err,
        s_err - p_err,
        latency_ratio,
        length_ratio,
        similarity,
        identical,
        floor,
    )


def noise_floor(primaries: "pd.DataFrame") -> NoiseFloor:
    """Similarity of the variant with itself: its answers to repeated prompts, two by two in time order."""
    answered = primaries[
        (primaries["status"] == 200) & primaries["response_text"].notna() & primaries["prompt_text"].notna()
    ]
    scores: list[float] = []
    same: list[float] = []
    for _, group in answered.sort_values("timestamp").groupby(["endpoint", "prompt_text"], sort=False):
        texts = list(group["response_text"])
        for x, y in zip(texts[0::2], texts[1::2]):
            scores.append(token_f1(x, y))
            same.append(1.0 if x.strip() == y.strip() else 0.0)
    if not scores:
        return NoiseFloor(0, None, None)
    return NoiseFloor(len(scores), statistics.fmean(scores), statistics.fmean(same))


def shadow_variants(frame: "pd.DataFrame", route: str | None = None) -> list[tuple[str, str]]:
    """(route, shadow variant) pairs present in ``frame``."""
    rows = frame[frame["role"] == "shadow"]
    if route is not None:
        rows = rows[rows["route"] == route]
    return sorted({(str(r), str(v)) for r, v in zip(rows["route"], rows["variant"])})


COLUMNS = (
    "request_id",
    "timestamp",
    "route",
    "variant",
    "role",
    "endpoint",
    "status",
    "latency_s",
    "completion_tokens",
    "prompt_text",
    "response_text",
)  # what a comparison reads of the log


def report(
    log: "RequestLog",
    window: "Window",
    route: str | None = None,
    variant: str | None = None,
    primary: str | None = None,
    *,
    rows: int = 10_000,
) -> list[ShadowComparison]:
    """Every shadow variant's comparison in ``window`` (or the one named).

    Bounded: at most ``rows`` shadow answers per shadow variant (a deterministic sample by request id),
    then the primary answers of exactly those requests, so every sampled shadow keeps its pair.
    ``window_shadow_rows`` says how many shadow answers the window held.
    """
    import pandas as pd

    from loragate.common.logschema import PRIMARY, SHADOW

    named = variant if route and variant else None
    shadows = log.sample(window, route, named, columns=COLUMNS, role=SHADOW, per_variant=rows)
    ids = frozenset(str(i) for i in shadows.frame["request_id"])
    primaries = log.requests(window, route, columns=COLUMNS, role=PRIMARY, ids=ids)
    frame = pd.concat([primaries, shadows.frame], ignore_index=True) if len(primaries) else shadows.frame
    targets = [(route, variant)] if route and variant else shadow_variants(frame, route)
    out = []
    for r, v in targets:
        if r is not None and v is not None:
            comparison = compare(frame, r, v, primary)
            comparison.window_shadow_rows = shadows.window_rows.get(v, 0)
            out.append(comparison)
    return out


# --- the gate before a canary ---------------------------------------------------------------


class ShadowGate(BaseModel):
    """``shadow_gate`` of a rollout: the canary must first have answered enough shadow traffic, well."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(3600, gt=0, description="request-log window the shadow pairs are read from")
    min_pairs: int = Field(50, ge=1, description="paired requests needed before deciding")
    max_error_rate_delta: float = Field(0.02, ge=0, description="shadow error rate - primary error rate, at most")
    max_latency_ratio: float | None = Field(2.0, gt=0, description="median shadow / primary latency, at most")
    min_similarity: float | None = Field(None, ge=0, le=1, description="mean token F1 with the primary, at least")
    min_length_ratio: float | None = Field(None, ge=0, description="shadow / primary answer length, at least")


class ShadowsConfig(BaseModel):
    """The monitor's ``shadows`` section: compare every shadow variant in the log on a schedule."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(300, gt=0)
    window_s: float = Field(3600, gt=0)
    routes: list[str] | None = None  # default: every route with shadow answers in the window


@dataclass
class GateResult:
    decision: Literal["pass", "fail", "insufficient_data"]
    explanation: str
    comparison: ShadowComparison


def gate(comparison: ShadowComparison, config: ShadowGate) -> GateResult:
    c = comparison
    if c.pairs < config.min_pairs:
        return GateResult("insufficient_data", f"{c.pairs} of min {config.min_pairs} shadow pairs", c)
    failures = []
    if c.error_rate_delta is not None and c.error_rate_delta > config.max_error_rate_delta:
        failures.append(
            f"error rate {c.shadow_error_rate:.3f} vs {c.primary_error_rate:.3f} "
            f"(delta > {config.max_error_rate_delta:g})"
        )
    if (
        config.max_latency_ratio is not None
        and c.latency_ratio is not None
        and c.latency_ratio > config.max_latency_ratio
    ):
        failures.append(f"latency ratio {c.latency_ratio:.2f} > {config.max_latency_ratio:g}")
    if config.min_similarity is not None and (c.similarity is None or c.similarity < config.min_similarity):
        failures.append(f"similarity {fmt(c.similarity)} < {config.min_similarity:g}")
    if config.min_length_ratio is not None and (c.length_ratio is None or c.length_ratio < config.min_length_ratio):
        failures.append(f"length ratio {fmt(c.length_ratio)} < {config.min_length_ratio:g}")
    if failures:
        return GateResult("fail", "; ".join(failures), c)
    return GateResult(
        "pass",
        f"{c.pairs} pairs: error delta {fmt(c.error_rate_delta)}, latency ratio "
        f"{fmt(c.latency_ratio)}, similarity {fmt(c.similarity)}",
        c,
    )


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# --- the monitor's series ------------------------------------------------------------------


class ShadowComparisonMetrics:
    """loragate_shadow_* gauges on the monitor's /metrics (the gateway's counters are loragate_shadow_*_total)."""

    def __init__(self, registry: "CollectorRegistry") -> None:
        from prometheus_client import Gauge

        labels = ("route", "variant", "primary")
        r = registry
        self.pairs = Gauge(
            "loragate_shadow_pairs", "Paired primary/shadow requests in the last comparison window.", labels, registry=r
        )
        self.error_rate = Gauge(
            "loragate_shadow_error_ratio",
            "Share of errors (status other than 200) among the pairs, by side (role: primary, shadow).",
            (*labels, "role"),
            registry=r,
        )
        self.latency_ratio = Gauge(
            "loragate_shadow_latency_ratio", "Median shadow latency / median primary latency.", labels, registry=r
        )
        self.length_ratio = Gauge(
            "loragate_shadow_length_ratio", "Shadow / primary completion tokens.", labels, registry=r
        )
        self.similarity = Gauge(
            "loragate_shadow_similarity_ratio",
            "Mean token-overlap F1 of shadow and primary answers.",
            labels,
            registry=r,
        )
        self.identical = Gauge(
            "loragate_shadow_identical_ratio", "Share of shadow answers identical to the primary.", labels, registry=r
        )
        self.floor = Gauge(
            "loragate_shadow_noise_floor_similarity_ratio",
            "Mean token F1 of the primary variant with itself (repeat prompts in the window).",
            labels,
            registry=r,
        )
        self.floor_identical = Gauge(
            "loragate_shadow_noise_floor_identical_ratio",
            "Share of identical answers of the primary variant to repeat prompts.",
            labels,
            registry=r,
        )
        self.last_run = Gauge(
            "loragate_shadow_comparison_timestamp_seconds", "When the comparison last ran.", labels, registry=r
        )

    def record(self, c: ShadowComparison, now: float) -> None:
        labels = (c.route, c.variant, c.primary or "")
        self.pairs.labels(*labels).set(c.pairs)
        self.last_run.labels(*labels).set(now)
        for gauge, value in (
            (self.error_rate.labels(*labels, "primary"), c.primary_error_rate),
            (self.error_rate.labels(*labels, "shadow"), c.shadow_error_rate),
            (self.latency_ratio.labels(*labels), c.latency_ratio),
            (self.length_ratio.labels(*labels), c.length_ratio),
            (self.similarity.labels(*labels), c.similarity),
            (self.identical.labels(*labels), c.identical_rate),
            (self.floor.labels(*labels), c.noise_floor.similarity),
            (self.floor_identical.labels(*labels), c.noise_floor.identical_rate),
        ):
            if value is not None:
                gauge.set(value)
