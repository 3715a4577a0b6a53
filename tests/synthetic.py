"""Synthetic request-log frames for tests, benchmarks and demos (same columns as the real log)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loragate.common.logschema import SCHEMA_VERSION

if TYPE_CHECKING:
    import pandas as pd

COMMON_WORDS = (
    "account order refund shipping password reset invoice payment card delivery address change "
    "cancel subscription plan upgrade login error help please thanks my the a to for is not can how "
    "what when why where i you we it this that with on in of and"
).split()
NEW_WORDS = (
    "kubernetes helm ingress autoscaler tensor gradient quantization kernel latency throughput "
    "embedding tokenizer adapter checkpoint vector cluster shard replica"
).split()


def requests_frame(
    n: int,
    *,
    seed: int = 0,
    route: str = "support",
    variant: str = "v1",
    prompt_words: float = 12.0,
    new_vocabulary: float = 0.0,
    latency_scale: float = 1.0,
    start: float = 1_750_000_000.0,
    span_s: float = 3600.0,
) -> "pd.DataFrame":
    """``n`` requests. ``prompt_words``: mean prompt length in words; ``new_vocabulary``: share
    of prompt words drawn from a vocabulary the default traffic never uses; ``latency_scale``
    multiplies latency and TTFT."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    common, new = np.array(COMMON_WORDS), np.array(NEW_WORDS)
    lengths = np.maximum(1, rng.poisson(prompt_words, n))
    prompts = []
    for k in lengths:
        draw = np.where(rng.random(k) < new_vocabulary, rng.choice(new, k), rng.choice(common, k))
        prompts.append(" ".join(draw))
    answer_lengths = np.maximum(1, rng.poisson(20, n))
    responses = [" ".join(rng.choice(common, k)) for k in answer_lengths]
    prompt_tokens = (lengths * 1.3 + rng.integers(0, 3, n)).astype("int64")
    completion_tokens = (answer_lengths * 1.3 + rng.integers(0, 3, n)).astype("int64")
    stream = rng.random(n) < 0.5
    latency = rng.gamma(4.0, 0.05, n) * latency_scale + completion_tokens * 0.01
    ttft = np.where(stream, rng.gamma(4.0, 0.01, n) * latency_scale, np.nan)
    cost = prompt_tokens * 1e-7 + completion_tokens * 2e-7
    return pd.DataFrame(
        {
            "request_id": [f"req-{seed}-{i}" for i in range(n)],
            "timestamp": pd.to_datetime(start + np.sort(rng.random(n)) * span_s, unit="s", utc=True),
            "route": route,
            "variant": variant,
            "endpoint": "chat/completions",
            "status": 200,
            "stream": stream,
            "fallback": np.where(rng.random(n) < 0.03, "upstream_error", None),
            "latency_s": latency,
            "ttft_s": ttft,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cost_usd": cost,
            "reference_cost_usd": cost * 5,
            "finish_reason": np.where(rng.random(n) < 0.9, "stop", "length"),
            "prompt_text": prompts,
            "response_text": responses,
            # One user turn per request, as the request log stores chat prompts (logschema v2); prompt_text
            # stays the bare prompt, so the drift calibration above is unchanged.
            "prompt_messages": [[{"role": "user", "content": prompt}] for prompt in prompts],
            "schema_version": SCHEMA_VERSION,
        }
    )
