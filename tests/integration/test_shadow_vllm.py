"""Shadow traffic on the real vLLM engine: adapter a2 shadows a1 at 100 %.

The primary answers of a shadowed route are the same bytes (apart from ids and timing) as those of
the same requests on a route without a shadow (greedy decoding; each shadow is awaited before the
next request, as vLLM's numerics depend on what else is in the batch); every shadow answer is in the request log paired
with its primary; and the monitor's comparison finds a2's answers below a1's noise floor (a1 with
itself on repeated prompts at temperature 0).
"""

from __future__ import annotations

import json
import re
import time

import httpx

from loragate.cli import main as cli
from tests.metrics_text import sample_sum
from tests.processes import start_gateway, wait_http

PROMPTS = [
    "The capital of France is",
    "Write a haiku about rain",
    "List three colours",
    "What is two plus two?",
    "Say hello in Spanish",
]
_VOLATILE = re.compile(rb'"(id|created|system_fingerprint)":("[^"]*"|\d+|null)')


def normalized(body: bytes) -> bytes:
    return _VOLATILE.sub(rb'"\1":_', body)


def test_shadow_never_changes_the_primary_and_is_compared(engine, tmp_path, capsys):
    routes = tmp_path / "routes.yaml"
    routes.write_text("""
routes:
  plain:
    variants: [{name: v1, adapter: a1, weight: 1}]
  shadowed:
    variants:
      - {name: v1, adapter: a1, weight: 1}
      - {name: v2, adapter: a2, weight: 0}
    shadow: {variant: v2, percent: 100, max_in_flight: 8}
""")
    log_root = tmp_path / "requestlog"
    service, url = start_gateway(
        routes,
        [engine],
        tmp_path / "gateway.log",
        extra_env={
            "LORAGATE_REQUEST_LOG_URL": str(log_root),
            "LORAGATE_REQUEST_LOG_TEXT": "full",
            "LORAGATE_REQUEST_LOG_FLUSH_INTERVAL_S": "0.5",
        },
    )
    ids: list[str] = []

    def shadows_answered(client: httpx.Client) -> float:
        return sample_sum(
            client.get("/metrics").text,
            "loragate_shadow_requests_total",
            route="shadowed",
            variant="v2",
            status_class="2xx",
        )

    try:
        wait_http(f"{url}/readyz", service.process, 60, tmp_path / "gateway.log")
        with httpx.Client(base_url=url, timeout=120) as client:
            for repeat in range(2):  # each prompt twice: repeat pairs for the noise floor
                for index, prompt in enumerate(PROMPTS):
                    request = {
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": 16,
                        "temperature": 0,
                        "stream": index % 2 == 1,
                    }
                    answers = {}
                    for model in ("plain", "shadowed"):
                        response = client.post("/v1/chat/completions", json={**request, "model": model})
                        assert response.status_code == 200, response.text
                        assert response.headers["x-loragate-variant"] == "v1"
                        answers[model] = response.content
                        if model == "shadowed":
                            ids.append(response.headers["x-request-id"])
                    assert normalized(answers["shadowed"]) == normalized(answers["plain"]), prompt
                    # The shadow is sent once its primary answered; wait for it, so that no later
                    # request shares the engine with it (its batches would change that request's numerics).
                    deadline = time.monotonic() + 60
                    while shadows_answered(client) < len(ids) and time.monotonic() < deadline:
                        time.sleep(0.05)
            assert shadows_answered(client) == len(ids) == 10
            metrics = client.get("/metrics").text
            # Client-facing series: no v2 request, no v2 tokens.
            assert sample_sum(metrics, "loragate_requests_total", variant="v2") == 0
            assert sample_sum(metrics, "loragate_completion_tokens_total", variant="v2") == 0
            assert sample_sum(metrics, "loragate_requests_total", route="shadowed", variant="v1") == 10
            assert sample_sum(metrics, "loragate_shadow_dropped_total") == 0
    finally:
        service.stop()  # drains the request log

    assert cli(["shadow", "report", "--request-log", str(log_root), "--route", "shadowed", "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert (report["variant"], report["primary"], report["pairs"], report["answered_pairs"]) == ("v2", "v1", 10, 10)
    assert report["shadow_error_rate"] == 0 and report["primary_error_rate"] == 0
    floor = report["noise_floor"]
    assert floor["pairs"] == 5 and floor["identical_rate"] == 1.0 and floor["similarity"] == 1.0
    assert report["similarity"] < floor["similarity"] and report["identical_rate"] < 1.0 and report["below_floor"]

    from loragate.monitoring.sources import RequestLog, Window

    rows = RequestLog(log_root).requests(Window.last(3600), "shadowed", role=None)
    pairs = rows.groupby("request_id")["role"].apply(sorted).to_dict()
    assert pairs == {request_id: ["primary", "shadow"] for request_id in ids}
    assert set(RequestLog(log_root).requests(Window.last(3600), "shadowed")["role"]) == {"primary"}
