"""The monitor's adapter probe: asks each engine of a canary, over aiohttp, whether the adapter is applied.

The comparison itself (fixed prompts, greedy completions with logprobs, adapter vs base model, the verdict) is
loragate/common/adapterprobe.py, shared with the gateway's probe after each adapter load (service/adapterprobe.py).

Why the engines and not the gateway (a ``route:variant`` pin): the gateway's fallback chain answers
a failing adapter with the base model, which would read as "not applied" (or hide an error), and the
gateway chooses the replica, while the fault is one engine's (one adapter slot); each engine is
asked here, by its own URL, with the adapter loaded there first when the route gives its path (as
the gateway loads adapters on demand). Results: ``applied``, ``not_applied``, ``error`` (the engine did
not answer both asks).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loragate.common.adapterprobe import (
    PROMPTS,
    RESULTS,
    TOLERANCE,
    Answer,
    Result,
    ask,
    difference,
    failure,
    parse_answer,
    verdict,
)
from loragate.common.httpbody import read_capped

# The shared core's names stay importable from here (the rollout's metrics and tests use them).
__all__ = [
    "PROMPTS",
    "RESULTS",
    "AdapterProbe",
    "Answer",
    "EngineProbe",
    "ProbeConfig",
    "ProbeResult",
    "Result",
    "difference",
    "parse_answer",
]

MAX_BODY = 1 << 20  # a completion of a few tokens with logprobs is a few KB
MODELS_MAX = 4 << 20  # /v1/models: some 9,000 adapters (the gateway's cap, service/replicas.py)


class ProbeConfig(BaseModel):
    """The ``probe`` section of a canary: which engines to ask, and how."""

    model_config = ConfigDict(extra="forbid")
    engines: list[str] = Field(min_length=1, description="each vLLM engine's base URL (http://host:8000)")
    prompts: list[str] = Field(default_factory=lambda: list(PROMPTS), min_length=1)
    max_tokens: int = Field(4, ge=1, le=64)
    tolerance: float = Field(TOLERANCE, ge=0, description="logprob differences up to this are 'the same'")
    timeout_s: float = Field(30, gt=0)
    load: bool = Field(True, description="load the adapter on an engine that lacks it (from the route's path)")
    api_key_env: str | None = Field(None, description="environment variable holding the engines' API key")


@dataclass
class EngineProbe:
    engine: str
    result: Result
    max_difference: float | None = None  # largest logprob difference over the prompts (inf: other tokens)
    explanation: str = ""


@dataclass
class ProbeResult:
    adapter: str
    base_model: str
    engines: list[EngineProbe] = field(default_factory=list)

    @property
    def result(self) -> Result:
        """not_applied when any engine answers as the base model; error when none answered; else applied."""
        found = {e.result for e in self.engines}
        if "not_applied" in found:
            return "not_applied"
        return "applied" if "applied" in found else "error"

    @property
    def explanation(self) -> str:
        return "; ".join(f"{e.engine}: {e.explanation}" for e in self.engines)

    def as_dict(self) -> dict[str, Any]:
        return {"result": self.result, **asdict(self)}


class AdapterProbe:
    """Asks engines over HTTP (aiohttp); one instance serves every rollout."""

    async def probe(
        self, config: ProbeConfig, *, base_model: str, adapter: str, path: str | None = None
    ) -> ProbeResult:
        import aiohttp

        headers = {}
        if config.api_key_env and os.environ.get(config.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[config.api_key_env]}"
        result = ProbeResult(adapter, base_model)
        timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            result.engines = list(
                await asyncio.gather(
                    *(
                        self._engine(session, url.rstrip("/"), config, base_model, adapter, path)
                        for url in config.engines
                    )
                )
            )
        return result

    async def _engine(
        self, session: Any, url: str, config: ProbeConfig, base_model: str, adapter: str, path: str | None
    ) -> EngineProbe:
        try:
            if config.load and path is not None and adapter not in await self._models(session, url):
                await self._post(
                    session, f"{url}/v1/load_lora_adapter", {"lora_name": adapter, "lora_path": path}, expect_json=False
                )
            answers = []
            for prompt in config.prompts:
                base, adapted = await asyncio.gather(
                    self._complete(session, url, base_model, prompt, config),
                    self._complete(session, url, adapter, prompt, config),
                )
                answers.append((base, adapted))
        except Exception as exc:  # unreachable, refused, not a completion: this engine says nothing
            found = failure(exc)
        else:
            found = verdict(answers, config.tolerance, adapter=adapter, base_model=base_model)
        return EngineProbe(url, found.result, found.max_difference, found.explanation)

    async def _models(self, session: Any, url: str) -> set[str]:
        body = await self._get(session, f"{url}/v1/models")
        return {str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)}

    async def _complete(self, session: Any, url: str, model: str, prompt: str, config: ProbeConfig) -> Answer:
        body = await self._post(session, f"{url}/v1/completions", ask(model, prompt, config.max_tokens))
        return parse_answer(body)

    async def _get(self, session: Any, url: str) -> Any:
        async with session.get(url) as resp:
            return _decoded(resp.status, await read_capped(resp, MODELS_MAX), url)

    async def _post(self, session: Any, url: str, payload: dict[str, Any], expect_json: bool = True) -> Any:
        async with session.post(url, json=payload) as resp:
            raw = await read_capped(resp, MAX_BODY)
            if not expect_json:
                if resp.status >= 400:
                    raise RuntimeError(f"{url}: HTTP {resp.status}: {raw[:200].decode('utf-8', 'replace')}")
                return None
            return _decoded(resp.status, raw, url)


def _decoded(status: int, raw: bytes, url: str) -> Any:
    if status >= 400:
        raise RuntimeError(f"{url}: HTTP {status}: {raw[:200].decode('utf-8', 'replace')}")
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError(f"{url}: answer is not a JSON object")
    return body
