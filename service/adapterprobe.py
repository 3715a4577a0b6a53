"""After the gateway loads an adapter on a replica: is it applied there, or does the engine answer its name with
the base model (vllm#55193, vllm#34186)? The comparison is loragate/common/adapterprobe.py's, shared with the
monitor's probe; this module only asks one replica, through the gateway's control client.

Every ask of a probe (each prompt, once naming the base model and once the adapter) goes at once, each bounded by
``timeout_s`` and its answer by ``ANSWER_MAX_BYTES``: a probe costs the first request of a load about one short
completion's time (measured in tests/integration/test_adapter_probe_vllm.py), and nothing after the load.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

from loragate.common.adapterprobe import PROMPTS, TOLERANCE, Answer, Verdict, ask, failure, parse_answer, verdict
from loragate.service.transport import ControlClient, Timeout, TransportError

# A completion of a few tokens with logprobs is a few KB; past this the answer is not one (and is not parsed).
ANSWER_MAX_BYTES = 256 << 10


class ProbeFailed(Exception):
    """A probe ask the engine did not answer with a completion."""


@dataclass(frozen=True)
class LoadProbe:
    """How the gateway probes an adapter it loaded: ``prompts`` (the first of PROMPTS), ``max_tokens`` each."""

    prompts: int = 2
    max_tokens: int = 4
    tolerance: float = TOLERANCE
    timeout_s: float = 5.0

    async def check(self, client: ControlClient, url: str, base_model: str, adapter: str) -> Verdict:
        """The replica's verdict on ``adapter``: applied, not_applied, or error (some ask went unanswered)."""
        prompts = PROMPTS[: self.prompts]
        asks = [ask(model, prompt, self.max_tokens) for prompt in prompts for model in (base_model, adapter)]
        answers = await asyncio.gather(*(self._complete(client, url, body) for body in asks), return_exceptions=True)
        got: list[Answer] = []
        for answer in answers:
            if isinstance(answer, (TransportError, ProbeFailed, ValueError)):
                return failure(answer)
            if isinstance(answer, BaseException):
                raise answer
            got.append(answer)
        pairs = [(got[i], got[i + 1]) for i in range(0, len(got), 2)]
        return verdict(pairs, self.tolerance, adapter=adapter, base_model=base_model)

    async def _complete(self, client: ControlClient, url: str, body: dict) -> Answer:
        reply = await client.post(
            f"{url}/v1/completions",
            orjson.dumps(body),
            timeout=Timeout(total=self.timeout_s),
            max_bytes=ANSWER_MAX_BYTES,
        )
        if reply.status != 200:
            raise ProbeFailed(f"HTTP {reply.status}: {reply.body[:200].decode(errors='replace')}")
        return parse_answer(orjson.loads(reply.body))  # orjson.JSONDecodeError is a ValueError
