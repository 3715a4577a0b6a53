"""The evaluation gate: a candidate adapter against the stable one, scored by the real vLLM engine.

Both adapters are loaded on the engine (``/v1/load_lora_adapter``) under their registry names,
after their cards are checked against their files (a mismatch is refused: the candidate is
rejected, never loaded). For every held-out row the engine scores prompt + reference answer in
one completions call with ``prompt_logprobs``: the answer tokens' negative log-likelihood, per
model. The verdict is a paired bootstrap of the NLL-per-token difference: the candidate passes
when the upper end of the interval is at most ``margin`` nats per token (non-inferiority), on
the held-out split and on the route's regression set if one is given. Greedy answers are also
compared with the references (token F1), reported beside the verdict.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loragate.common.adaptercard import Evaluation
from loragate.common.registry import (
    AdapterCard,
    CardMismatch,
    Registry,
    RegistryError,
    base_model_sha256,
    read_card,
    verify,
)
from loragate.pipeline.chatdata import DatasetError, Encoder, Example, Row, read_dataset
from loragate.pipeline.gate_stats import Comparison, paired_bootstrap, token_f1


class EvaluateError(Exception):
    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class GateConfig:
    candidate: str
    baseline: str
    engine: str
    data: str | None = None
    regression_set: str | None = None
    margin: float = 0.02
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0
    max_len: int = 255  # prompt + answer; the engine also needs room for the one token it generates
    generate_tokens: int = 32
    keep_loaded: bool = False
    concurrency: int = 4
    timeout_s: float = 120.0


@dataclass
class Scored:
    nll: list[float]  # summed over each example's answer tokens
    tokens: list[int]
    f1: list[float]


class Engine:
    """The few vLLM endpoints the gate needs."""

    def __init__(self, url: str, session: Any) -> None:
        self.url, self.session = url, session

    async def _json(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def models(self) -> list[dict]:
        status, body = await self._json("GET", "/v1/models")
        if status != 200 or not isinstance(body, dict):
            raise EvaluateError(f"engine {self.url}: GET /v1/models answered {status}")
        return body.get("data", [])

    async def ensure_loaded(self, name: str, path: str) -> bool:
        """Load the adapter unless the engine already has it from this path; True when we loaded it."""
        for model in await self.models():
            if model.get("id") == name:
                if Path(str(model.get("root"))).resolve() != Path(path).resolve():
                    raise EvaluateError(
                        f"engine {self.url} already has an adapter {name!r} from {model.get('root')}, not {path}"
                    )
                return False
        status, body = await self._json("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status != 200:
            raise EvaluateError(f"engine {self.url} could not load adapter {name} from {path}: {status} {body}")
        return True

    async def unload(self, name: str) -> None:
        """Best effort: an engine that is gone has nothing loaded."""
        import aiohttp

        try:
            await self._json("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except (TimeoutError, aiohttp.ClientError):
            pass

    async def answer_nll(self, model: str, example: Example) -> float:
        """Summed negative log-likelihood of the answer tokens given the prompt."""
        ids = example.prompt_ids + example.answer_ids
        status, body = await self._json(
            "POST",
            "/v1/completions",
            {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1},
        )
        if status != 200:
            raise EvaluateError(f"engine {self.url}: scoring with {model} answered {status}: {str(body)[:300]}")
        positions = body["choices"][0]["prompt_logprobs"]
        total = 0.0
        for index in range(len(example.prompt_ids), len(ids)):
            entry = positions[index] or {}
            logprob = entry.get(str(ids[index]))
            if logprob is None:
                raise EvaluateError(f"engine {self.url}: no logprob for prompt token {index} ({model})")
            total -= float(logprob["logprob"] if isinstance(logprob, dict) else logprob)
        return total

    async def generate(self, model: str, example: Example, max_tokens: int) -> str:
        status, body = await self._json(
            "POST",
            "/v1/completions",
            {"model": model, "prompt": example.prompt_ids, "max_tokens": max_tokens, "temperature": 0.0},
        )
        if status != 200:
            raise EvaluateError(f"engine {self.url}: generating with {model} answered {status}: {str(body)[:300]}")
        return str(body["choices"][0]["text"])


async def score(
    engine: Engine, model: str, rows: list[Row], examples: list[Example], *, generate_tokens: int, concurrency: int
) -> Scored:
    """NLL of every reference answer, one request at a time; then greedy answers for F1, concurrently.

    One at a time: vLLM 0.32 maps LoRA slots per request, not per prompt token, when it computes
    prompt logprobs (vllm-project/vllm#16668); with two requests in one batch the CPU engine
    crashes, with one the mapping broadcasts correctly.
    """
    nll = [await engine.answer_nll(model, example) for example in examples]
    if generate_tokens <= 0:
        return Scored(nll, [len(e.answer_ids) for e in examples], [])
    limit = asyncio.Semaphore(concurrency)

    async def f1(row: Row, example: Example) -> float:
        async with limit:
            text = await engine.generate(model, example, min(generate_tokens, len(example.answer_ids)))
            return token_f1(text, row.answer)

    f1s = await asyncio.gather(*(f1(r, e) for r, e in zip(rows, examples)))
    return Scored(nll, [len(e.answer_ids) for e in examples], list(f1s))


def _encode(path: str, encoder: Encoder) -> tuple[list[Row], list[Example], str]:
    try:
        dataset = read_dataset(path)
    except DatasetError as exc:
        raise EvaluateError(str(exc)) from None
    pairs = [(r, e) for r in dataset.rows if (e := encoder.encode(r)) is not None]
    if not pairs:
        raise EvaluateError(f"evaluation data {path}: no usable rows")
    return [r for r, _ in pairs], [e for _, e in pairs], dataset.sha256


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _card(directory: str, role: str) -> tuple[Path, AdapterCard]:
    try:
        return Path(directory), read_card(directory)
    except RegistryError as exc:
        raise EvaluateError(f"{role}: {exc}") from None


def run_gate(config: GateConfig) -> tuple[AdapterCard, Evaluation]:
    """Check, score, decide, record: the evaluation goes into the candidate's card; a fail rejects it."""
    cand_dir, cand = _card(config.candidate, "candidate")
    base_dir, base = _card(config.baseline, "baseline")
    registry = Registry(cand_dir.resolve().parent.parent)
    if cand.state != "candidate":
        raise EvaluateError(f"{cand.ref} is {cand.state}: only candidates go through the gate")
    if base.state in ("rejected", "retired"):
        raise EvaluateError(f"baseline {base.ref} is {base.state}")
    try:
        verify(base, base_dir)
    except CardMismatch as exc:
        raise EvaluateError(f"baseline refused: {exc}") from None
    try:
        verify(cand, cand_dir)
    except CardMismatch as exc:
        registry.transition(cand_dir, "rejected", by="gate", reason=str(exc))
        raise EvaluateError(f"candidate refused and rejected: {exc}", exit_code=1) from None
    if cand.base.sha256 != base.base.sha256:
        raise EvaluateError(f"{cand.ref} and {base.ref} are adapters of different base models")

    data = config.data or (cand.data.held_out_location if cand.data else None)
    if not data:
        raise EvaluateError(f"{cand.ref} has no held-out split in its card: pass --data")
    encoder = Encoder(cand.base.path or "", config.max_len)
    rows, examples, data_sha = _encode(data, encoder)
    if not config.data and cand.data and cand.data.held_out_sha256:
        held = hashlib.sha256(Path(data).read_bytes()).hexdigest()
        if held != cand.data.held_out_sha256:
            raise EvaluateError(f"the held-out split {data} changed after training (sha256 mismatch)")
    regression = _encode(config.regression_set, encoder) if config.regression_set else None

    held_cmp, reg_cmp, f1 = asyncio.run(_compare(config, cand, base, rows, examples, regression))
    verdict = "pass" if held_cmp.non_inferior and (reg_cmp is None or reg_cmp.non_inferior) else "fail"
    reason = _reason("held-out", held_cmp) + (f"; {_reason('regression set', reg_cmp)}" if reg_cmp else "")
    evaluation = Evaluation(
        at=time.time(),
        baseline=base.ref,
        data=str(data),
        data_sha256=data_sha,
        examples=held_cmp.examples,
        tokens=held_cmp.tokens,
        candidate_nll=round(held_cmp.candidate_nll, 5),
        baseline_nll=round(held_cmp.baseline_nll, 5),
        delta=round(held_cmp.delta, 5),
        ci_low=round(held_cmp.ci_low, 5),
        ci_high=round(held_cmp.ci_high, 5),
        confidence=held_cmp.confidence,
        margin=held_cmp.margin,
        candidate_f1=f1[0],
        baseline_f1=f1[1],
        regression=_summary(config.regression_set, reg_cmp) if reg_cmp else None,
        verdict=verdict,
        reason=reason,
    )
    card = registry.update(cand_dir, lambda c: c.evaluations.append(evaluation))
    if verdict == "fail":
        card = registry.transition(cand_dir, "rejected", by="gate", reason=reason)
    return card, evaluation


async def _compare(
    config: GateConfig,
    cand: AdapterCard,
    base: AdapterCard,
    rows: list[Row],
    examples: list[Example],
    regression: tuple[list[Row], list[Example], str] | None,
) -> tuple[Comparison, Comparison | None, tuple[float | None, float | None]]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        engine = Engine(config.engine, session)
        try:
            await _check_engine_base(engine, cand)
            loaded = [
                m.served_name for m in (cand, base) if await engine.ensure_loaded(m.served_name, m.artifact.location)
            ]
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise EvaluateError(f"engine {config.engine} unreachable: {type(exc).__name__}: {exc}") from None
        try:
            scored = {}
            for card in (cand, base):
                scored[card.ref] = await score(
                    engine,
                    card.served_name,
                    rows,
                    examples,
                    generate_tokens=config.generate_tokens,
                    concurrency=config.concurrency,
                )
            held = _bootstrap(config, scored[cand.ref], scored[base.ref])
            reg = None
            if regression:
                reg_scores = [
                    await score(
                        engine,
                        c.served_name,
                        regression[0],
                        regression[1],
                        generate_tokens=0,
                        concurrency=config.concurrency,
                    )
                    for c in (cand, base)
                ]
                reg = _bootstrap(config, *reg_scores)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise EvaluateError(f"engine {config.engine} failed while scoring: {type(exc).__name__}: {exc}") from None
        finally:
            for name in loaded:
                if name != cand.served_name or not config.keep_loaded:
                    await engine.unload(name)
    return held, reg, (_mean(scored[cand.ref].f1), _mean(scored[base.ref].f1))


async def _check_engine_base(engine: Engine, card: AdapterCard) -> None:
    """When the engine's base model is a local directory, it must be the one the adapters were trained on."""
    for model in await engine.models():
        if model.get("parent") is None and model.get("root") and Path(str(model["root"])).is_dir():
            if base_model_sha256(model["root"]) != card.base.sha256:
                raise EvaluateError(
                    f"engine {engine.url} serves base model {model['root']}, not the one "
                    f"{card.ref} was trained on ({card.base.path})"
                )


def _bootstrap(config: GateConfig, cand: Scored, base: Scored) -> Comparison:
    return paired_bootstrap(
        cand.nll,
        base.nll,
        cand.tokens,
        margin=config.margin,
        confidence=config.confidence,
        resamples=config.resamples,
        seed=config.seed,
    )


def _reason(label: str, c: Comparison) -> str:
    verdict = "not worse" if c.non_inferior else "worse"
    return (
        f"{label}: NLL/token {c.candidate_nll:.4f} vs {c.baseline_nll:.4f}, delta {c.delta:+.4f} "
        f"[{c.confidence:.0%} CI {c.ci_low:+.4f}, {c.ci_high:+.4f}] over {c.examples} rows: {verdict} "
        f"(margin {c.margin})"
    )


def _summary(location: str | None, c: Comparison) -> dict[str, Any]:
    return {
        "data": location,
        "examples": c.examples,
        "tokens": c.tokens,
        "candidate_nll": round(c.candidate_nll, 5),
        "baseline_nll": round(c.baseline_nll, 5),
        "delta": round(c.delta, 5),
        "ci_low": round(c.ci_low, 5),
        "ci_high": round(c.ci_high, 5),
        "non_inferior": c.non_inferior,
    }
