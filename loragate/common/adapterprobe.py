"""Is an adapter applied? The comparison both probes share, without any HTTP.

vLLM has served base-model output for requests that named an adapter (vllm#55193, vllm#34186). A probe asks
one engine, for each of a few fixed prompts, a greedy completion (``ask``: temperature 0, a few tokens,
``logprobs``) once naming the adapter and once naming the base model. A LoRA adapter that is applied moves the
logits, so the chosen tokens' logprobs differ; the same tokens with the same logprobs (within ``tolerance``)
on every prompt mean the engine answered the adapter's name with the base model: **not_applied** (``verdict``).

Two probes ask: the monitor's (monitoring/probe.py, at a rollout's start and each canary analysis, over
aiohttp) and the gateway's, after each adapter load it makes (service/adapterprobe.py, over its control
client). What neither can see: an adapter applied but wrong (another version under the same name), or one
whose effect on these prompts' first tokens is below ``tolerance`` (a zero adapter is what it reports).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Result = Literal["applied", "not_applied", "error"]
RESULTS: tuple[Result, ...] = ("applied", "not_applied", "error")
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Translate to German: good morning")
TOLERANCE = 1e-4  # logprob differences up to this are float noise, not an adapter


@dataclass
class Answer:
    tokens: list[str]
    logprobs: list[float]


@dataclass(frozen=True)
class Verdict:
    """One engine's answer to "is the adapter applied here?"."""

    result: Result
    max_difference: float | None = None  # largest logprob difference over the prompts (inf: other tokens)
    explanation: str = ""


def ask(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The body of one probe completion (POST /v1/completions): greedy, seeded, the chosen tokens' logprobs."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1, "seed": 0}


def difference(base: Answer, adapted: Answer) -> float:
    """Largest |logprob difference| over the tokens; inf when the chosen tokens differ."""
    if base.tokens != adapted.tokens or len(base.logprobs) != len(adapted.logprobs):
        return math.inf
    return max((abs(a - b) for a, b in zip(base.logprobs, adapted.logprobs)), default=0.0)


def parse_answer(body: Any) -> Answer:
    """The first choice's tokens and their logprobs from an OpenAI completions answer with ``logprobs``.

    Linear in the answer's size (one pass over its token list); ValueError for anything else."""
    try:
        logprobs = body["choices"][0]["logprobs"]
        tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
        if not (isinstance(tokens, list) and isinstance(values, list) and len(tokens) == len(values)):
            raise TypeError("tokens and token_logprobs must be lists of one length")
        return Answer([str(t) for t in tokens], [float(v) if v is not None else math.nan for v in values])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"no token logprobs in the answer ({exc})") from None


def verdict(answers: Sequence[tuple[Answer, Answer]], tolerance: float, *, adapter: str, base_model: str) -> Verdict:
    """The engine's verdict from its (base, adapted) answers, one pair per prompt."""
    if not answers:
        return failure(ValueError("no prompts asked"))
    worst = max(difference(base, adapted) for base, adapted in answers)
    if worst <= tolerance:
        return Verdict(
            "not_applied",
            worst,
            f"{adapter} answers exactly as {base_model} on {len(answers)} prompts "
            f"(logprobs within {tolerance:g}): the adapter is not applied",
        )
    shown = "other tokens" if math.isinf(worst) else f"logprobs differ by up to {worst:.3g}"
    return Verdict("applied", worst, f"{adapter} differs from {base_model} ({shown}): applied")


def failure(exc: BaseException) -> Verdict:
    """The engine did not answer every ask (unreachable, refused, not a completion): it says nothing."""
    return Verdict("error", None, f"probe failed: {type(exc).__name__}: {exc}"[:300])
