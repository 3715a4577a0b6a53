"""The gateway in front of the real vLLM CPU engine, driven by the official OpenAI SDK."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import openai
import pytest

from tests.metrics_text import sample_sum, scrape

pytestmark = pytest.mark.integration
HELLO = [{"role": "user", "content": "Tell me about the weather today."}]


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def aclient(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_through_the_gateway(client):
    raw = client.chat.completions.with_raw_response.create(model="adapter", messages=HELLO, max_tokens=8, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-loragate-route"] == "adapter"
    assert raw.headers["x-loragate-variant"] == "a1"
    assert len(raw.headers["x-request-id"]) >= 16
    assert "x-loragate-fallback" not in raw.headers
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens > 0


def test_text_completion_through_the_gateway(client):
    completion = client.completions.create(model="base", prompt="def main():", max_tokens=5, temperature=0)
    assert completion.choices[0].text
    assert completion.usage.completion_tokens == 5


def test_streaming_passes_chunks_and_hides_usage_unless_asked(client, gateway):
    before = scrape(gateway)
    chunks = list(
        client.chat.completions.create(model="adapter", messages=HELLO, max_tokens=6, temperature=0, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert all(c.choices for c in chunks), "the usage-only chunk must not reach a client that did not ask"
    # Event by event, not one buffered blob (vLLM may merge tokens into one event when busy).
    assert len(chunks) >= 3
    after = scrape(gateway)
    # ... yet the gateway learned the usage.
    delta = sample_sum(after, "loragate_completion_tokens_total", route="adapter") - sample_sum(
        before, "loragate_completion_tokens_total", route="adapter"
    )
    assert delta == 6
    assert (
        sample_sum(after, "loragate_time_to_first_token_seconds_count", route="adapter")
        - sample_sum(before, "loragate_time_to_first_token_seconds_count", route="adapter")
    ) == 1

    asked = list(
        client.chat.completions.create(
            model="adapter",
            messages=HELLO,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 6


def test_streaming_text_completion(client):
    chunks = list(client.completions.create(model="base", prompt="import os", max_tokens=4, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_adapter_and_base_outputs_differ(client):
    def answer(model: str) -> str:
        return (
            client.chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=0)
            .choices[0]
            .message.content
        )

    base, adapter = answer("base"), answer("adapter")
    assert base != adapter
    assert answer("adapter") == adapter  # deterministic at temperature 0


async def test_weighted_split_of_1000_requests(aclient, gateway):
    n, share = 1000, 0.10
    before = scrape(gateway)
    semaphore = asyncio.Semaphore(16)

    async def one() -> str:
        async with semaphore:
            raw = await aclient.completions.with_raw_response.create(model="split", prompt="hi", max_tokens=1)
            return raw.headers["x-loragate-variant"]

    variants = Counter(await asyncio.gather(*(one() for _ in range(n))))
    assert set(variants) == {"v1", "v2"}
    assert variants["v1"] + variants["v2"] == n
    sigma = math.sqrt(n * share * (1 - share))  # binomial: 9.5 at n=1000
    assert abs(variants["v2"] - n * share) <= 4 * sigma, variants

    # Every request is counted, under the variant that served it.
    after = scrape(gateway)
    for variant in ("v1", "v2"):
        counted = sample_sum(
            after, "loragate_requests_total", route="split", variant=variant, status_class="2xx"
        ) - sample_sum(before, "loragate_requests_total", route="split", variant=variant, status_class="2xx")
        assert counted == variants[variant]
    prompt = sample_sum(after, "loragate_prompt_tokens_total", route="split") - sample_sum(
        before, "loragate_prompt_tokens_total", route="split"
    )
    completion = sample_sum(after, "loragate_completion_tokens_total", route="split") - sample_sum(
        before, "loragate_completion_tokens_total", route="split"
    )
    assert completion == n
    cost = sample_sum(after, "loragate_cost_usd_total", route="split") - sample_sum(
        before, "loragate_cost_usd_total", route="split"
    )
    reference = sample_sum(after, "loragate_reference_cost_usd_total", route="split") - sample_sum(
        before, "loragate_reference_cost_usd_total", route="split"
    )
    assert cost == pytest.approx((prompt * 0.001 + completion * 0.002) / 1000)
    assert reference == pytest.approx((prompt * 0.01 + completion * 0.03) / 1000)
    assert sample_sum(after, "loragate_rollout_weight", route="split", variant="v2") == pytest.approx(0.1)


def test_sticky_keys_stay_on_their_variant(client):
    seen: dict[str, set[str]] = {}
    for round_ in range(3):
        for user in range(40):
            raw = client.completions.with_raw_response.create(
                model="split", prompt="hi", max_tokens=1, extra_headers={"x-user-id": f"user-{user}"}
            )
            seen.setdefault(f"user-{user}", set()).add(raw.headers["x-loragate-variant"])
    assert all(len(variants) == 1 for variants in seen.values()), seen
    assert {v for variants in seen.values() for v in variants} <= {"v1", "v2"}


def test_pinned_variant_is_honoured(client):
    for _ in range(5):
        by_model = client.completions.with_raw_response.create(model="split:v2", prompt="hi", max_tokens=1)
        assert by_model.headers["x-loragate-variant"] == "v2"
        by_header = client.completions.with_raw_response.create(
            model="split", prompt="hi", max_tokens=1, extra_headers={"x-loragate-variant": "v2"}
        )
        assert by_header.headers["x-loragate-variant"] == "v2"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="split:nope", prompt="hi", max_tokens=1)
    assert info.value.body["code"] == "invalid_variant"


async def test_adapter_not_loaded_is_loaded_on_demand_once(aclient, gateway, engine):
    import httpx

    models = httpx.get(f"{engine}/v1/models").json()["data"]
    assert "a3" not in {m["id"] for m in models}
    before = scrape(gateway)
    responses = await asyncio.gather(
        *(
            aclient.chat.completions.with_raw_response.create(model="lazy", messages=HELLO, max_tokens=4)
            for _ in range(8)
        )
    )
    assert {r.headers["x-loragate-variant"] for r in responses} == {"v3"}
    assert all("x-loragate-fallback" not in r.headers for r in responses)
    after = scrape(gateway)
    loads = sample_sum(after, "loragate_adapter_loads_total", adapter="a3", result="success") - sample_sum(
        before, "loragate_adapter_loads_total", adapter="a3", result="success"
    )
    assert loads == 1  # eight concurrent first requests, one load
    assert "a3" in {m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]}


def test_broken_adapter_falls_back_to_base(client, gateway):
    before = scrape(gateway)
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="broken", messages=HELLO, max_tokens=4)
        assert raw.status_code == 200
        assert raw.headers["x-loragate-variant"] == "base"
        assert raw.headers["x-loragate-fallback"] == "adapter_unavailable"
        assert raw.parse().choices[0].message.content
    after = scrape(gateway)
    fallbacks = sample_sum(after, "loragate_fallbacks_total", route="broken", variant="bad") - sample_sum(
        before, "loragate_fallbacks_total", route="broken", variant="bad"
    )
    assert fallbacks == 3
    # The failed load is remembered: one attempt, not one per request.
    assert sample_sum(after, "loragate_adapter_loads_total", adapter="broken-adapter", result="failed") == 1


def test_unknown_model_is_an_openai_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-route", messages=HELLO)
    assert info.value.body["code"] == "model_not_found"


def test_models_lists_routes_and_pinnable_variants(client):
    ids = {m.id for m in client.models.list()}
    assert {"adapter", "base", "split", "split:v1", "split:v2", "lazy", "broken"} <= ids
