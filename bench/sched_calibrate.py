"""Calibrate bench/sched_sim.py's engine model on the real vLLM CPU engine (the tiny demo model).

Starts one vLLM engine (one adapter slot per --max-loras 2, six adapters loadable), checks which
series its /metrics has, then measures, each as a median of a few requests (absolute numbers move
25%+ on this shared machine):

  prefill_s_per_token   TTFT slope over prompt length (distinct prompts: no prefix hits)
  step_s(batch)         time per output token with 1, 4, 16 requests decoding together
  prefix_hit_saving     TTFT of a repeated long prompt over that of a fresh one of the same length
  lora_swap_in_s        TTFT of a loaded adapter that is not in a slot, minus one that is (tiny adapters:
                        may be lost in the noise, then the simulation assumes a figure and says so)
  lora_load_s           /v1/load_lora_adapter round trip

Writes bench/results/sched_calibration.json. Run: .venv/bin/python bench/sched_calibrate.py
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loragate.service.demo_model import build_demo_model, demo_model_ready  # noqa: E402
from loragate.service.engine import engine_command, engine_env  # noqa: E402
from loragate.service.enginestate import parse_engine_metrics  # noqa: E402
from tests.processes import Service, free_port, wait_http  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega river stone cloud".split()
OUT = ROOT / "bench" / "results" / "sched_calibration.json"


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def ttft(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int = 1
) -> tuple[float, float]:
    """(time to first token, total time) of one streamed completion."""
    started = time.perf_counter()
    first = None
    async with client.stream(
        "POST",
        f"{url}/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        },
    ) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


async def prompt_tokens(client: httpx.AsyncClient, url: str, prompt: str) -> int:
    response = await client.post(f"{url}/tokenize", json={"model": "base", "prompt": prompt})
    return len(response.json()["tokens"])


async def calibrate(url: str, adapters: dict[str, str]) -> dict:
    rng = random.Random(7)
    result: dict = {}
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(3):  # warm up
            await ttft(client, url, "base", words(20, rng), 4)
        body = (await client.get(f"{url}/metrics")).content
        state = parse_engine_metrics(body)
        result["metrics"] = {
            "body_bytes": len(body),
            "missing": list(state.missing),
            "max_lora": state.max_lora,
            "series": sorted(
                {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if line.startswith("vllm:")}
            ),
        }
        # Prefill: TTFT against prompt length, fresh prompts.
        points = []
        for n_words in (10, 60, 120):
            times = []
            for _ in range(5):
                prompt = words(n_words, rng)
                times.append((await ttft(client, url, "base", prompt))[0])
            points.append((await prompt_tokens(client, url, words(n_words, rng)), statistics.median(times)))
        (x0, y0), (x1, y1) = points[0], points[-1]
        result["prefill"] = {
            "points_tokens_ttft_s": points,
            "s_per_token": max(0.0, (y1 - y0) / (x1 - x0)),
            "ttft_floor_s": y0,
        }
        # Decode step by batch size.
        # Decode step by batch size: whole requests of 33 tokens against 1, ``batch`` at once (streamed chunks
        # arrive bunched, so the time between them does not tell the step).
        steps = {}
        for batch in (1, 4, 16):
            timings = {}
            for tokens in (1, 33):
                rounds = []
                for _ in range(3):
                    outs = await asyncio.gather(
                        *(ttft(client, url, "base", words(10, rng), tokens) for _ in range(batch))
                    )
                    rounds.append(statistics.median(total for _, total in outs))
                timings[tokens] = statistics.median(rounds)
            steps[batch] = max(0.0, (timings[33] - timings[1]) / 32)
        result["decode_step_s"] = steps
        # Prefix-cache hits: the same long prompt again, against fresh ones.
        shared = words(120, rng)
        await ttft(client, url, "base", shared)
        hit = statistics.median([(await ttft(client, url, "base", shared))[0] for _ in range(5)])
        miss = statistics.median([(await ttft(client, url, "base", words(120, rng)))[0] for _ in range(5)])
        result["prefix"] = {"hit_ttft_s": hit, "miss_ttft_s": miss, "hit_over_miss": hit / miss}
        # LoRA: load time, then TTFT in a slot (same adapter again) against a swap (another adapter each time).
        loads = []
        for name, path in adapters.items():
            started = time.perf_counter()
            response = await client.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            assert response.status_code == 200, response.text
            loads.append(time.perf_counter() - started)
        result["lora_load_s"] = statistics.median(loads)
        names = list(adapters)
        await ttft(client, url, names[0], words(10, rng))
        in_slot = statistics.median([(await ttft(client, url, names[0], words(10, rng)))[0] for _ in range(5)])
        swaps = []
        for i in range(6):  # cycling through more adapters than slots (--max-loras 2): every one swaps in
            swaps.append((await ttft(client, url, names[1 + i % (len(names) - 1)], words(10, rng)))[0])
        swap = statistics.median(swaps)
        result["lora"] = {
            "in_slot_ttft_s": in_slot,
            "swap_ttft_s": swap,
            "swap_in_s": max(0.0, swap - in_slot),
            "max_loras": 2,
        }
        after = parse_engine_metrics((await client.get(f"{url}/metrics")).content)
        result["metrics"]["prefix_cache_queries"] = after.prefix_queries
        result["metrics"]["prefix_cache_hits"] = after.prefix_hits
    return result


def main() -> None:
    model_dir = Path(os.environ.get("LORAGATE_TEST_MODEL_DIR", tempfile.gettempdir() + "/loragate-sched-model"))
    if not demo_model_ready(model_dir, adapters=6):
        build_demo_model(model_dir, adapters=6)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "vllm.log"
    command = engine_command(
        Path(manifest["base"]), {}, port=port, python=sys.executable, max_loras=2, max_model_len=512
    )
    engine = Service(command, log, engine_env())
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        wait_http(f"{url}/health", engine.process, 400, log)
        ready_s = time.monotonic() - started
        result = asyncio.run(calibrate(url, manifest["adapters"]))
    finally:
        engine.stop()
    result["engine"] = {
        "model": "demo (random Llama, hidden 128, 2 layers, fp32)",
        "ready_s": round(ready_s, 1),
        "flags": command[3:],
    }
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()}
    OUT.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
