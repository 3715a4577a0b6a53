"""Replica scheduling on real engines: two vLLM engines, round-robin against loragate's picker, one table.

GPU mode (the default; one GPU, no network, under 8 minutes): builds a random-weight model with
Llama-3-8B's shapes (32 layers, hidden 4096, 8 KV heads, vocab 128256; bf16) and 16 LoRA adapters
(r=16 on q/k/v/o, random), starts two vLLM engines sharing the GPU (``--gpu-memory-utilization``
0.42 each, ``--max-loras 4``), and runs one workload against both, once per policy:

  multi-turn chats on 16 long system prompts (~1,500 tokens each), each prompt tied to one of the
  16 adapters (Zipf popularity), ``--clients`` concurrent conversations for ``--seconds`` each.

CPU mode (``--cpu``): the same comparison on the tiny demo model (service/demo_model.py) with two
vLLM CPU engines, shorter prompts; what two loaded cores can show.

Policies: ``round_robin`` (each request to the next engine; adapters loaded on demand wherever they
land) and ``loragate`` (the gateway's own Pool: replica set scraping each engine's /metrics, the
picker, the adapter loader; imported, not re-written). The engines start once; neither policy
inherits the other's caches (each gets system prompts of its own, and every adapter is unloaded
from both engines before it starts). Output: one table (throughput, TTFT p50/p99, prefix-cache
hit rate from the engines' own counters) and bench/results/sched_gpu.json (or sched_real_cpu.json).

Run: python bench/gpu/sched.py            (GPU)
     python bench/gpu/sched.py --cpu      (CPU: two vLLM CPU engines)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from loragate.service.aiohttpedge import AiohttpControl  # noqa: E402
from loragate.service.engine import engine_command, engine_env  # noqa: E402
from loragate.service.enginestate import parse_engine_metrics  # noqa: E402
from loragate.service.metrics import Metrics  # noqa: E402
from loragate.service.upstreams import Pool, Replica  # noqa: E402
from tests.processes import Service, free_port, wait_http  # noqa: E402

WORDS = (
    "river stone cloud order refund invoice shipping warranty account password delivery courier parcel "
    "battery screen keyboard cable charger contract policy"
).split()


# --- the model and the adapters (random weights, written locally) ------------------------------------


def build_model(out: Path, *, cpu: bool, adapters: int) -> dict:
    manifest = out / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    if cpu:
        from loragate.service.demo_model import build_demo_model

        return build_demo_model(out, adapters=adapters)
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from loragate.service.demo_model import build_tokenizer

    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(base, 8000)
    config = LlamaConfig(  # Llama-3-8B's shapes; the vocabulary is the local tokenizer's, padded
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"), torch.no_grad():
        model = LlamaForCausalLM(config)
        for param in model.parameters():  # small random matrices (norms stay 1): finite through 32 layers
            if param.dim() >= 2:
                param.normal_(std=0.02)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(base, safe_serialization=True, max_shard_size="4GB")
    del model
    torch.cuda.empty_cache()
    found = {}
    head_dim = config.hidden_size // config.num_attention_heads
    shapes = {
        "q_proj": (config.hidden_size, config.hidden_size),
        "k_proj": (config.num_key_value_heads * head_dim, config.hidden_size),
        "v_proj": (config.num_key_value_heads * head_dim, config.hidden_size),
        "o_proj": (config.hidden_size, config.hidden_size),
    }
    rank = 16
    for index in range(1, adapters + 1):
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for layer in range(config.num_hidden_layers):
            for name, (rows, cols) in shapes.items():
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
                tensors[f"{prefix}.lora_A.weight"] = (
                    torch.randn(rank, cols, generator=generator, dtype=torch.bfloat16) * 0.01
                )
                tensors[f"{prefix}.lora_B.weight"] = (
                    torch.randn(rows, rank, generator=generator, dtype=torch.bfloat16) * 0.01
                )
        directory = out / "adapters" / f"a{index}"
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "r": rank,
                    "lora_alpha": 32,
                    "lora_dropout": 0.0,
                    "bias": "none",
                    "target_modules": list(shapes),
                    "base_model_name_or_path": str(base),
                    "fan_in_fan_out": False,
                    "modules_to_save": None,
                }
            )
        )
        found[f"a{index}"] = str(directory)
    result = {"base": str(base), "adapters": found}
    manifest.write_text(json.dumps(result, indent=2))
    return result


def start_engines(model: dict, *, cpu: bool, log_dir: Path) -> tuple[list[Service], list[str]]:
    """Two engines, one after the other (the second measures the GPU memory the first left)."""
    services, urls = [], []
    for index in range(2):
        port = free_port()
        command = engine_command(
            Path(model["base"]),
            {},
            port=port,
            python=sys.executable,
            max_loras=4,
            max_lora_rank=16 if not cpu else 8,
            max_model_len=8192 if not cpu else 512,
        )
        env = engine_env()
        if cpu:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(index % max(1, os.cpu_count() or 1))  # one core each
        else:
            command[command.index("--dtype") + 1] = "bfloat16"
            command += ["--gpu-memory-utilization", "0.42", "--enforce-eager", "--max-num-seqs", "128"]
        service = Service(command, log_dir / f"engine{index}.log", env)
        services.append(service)
        urls.append(f"http://127.0.0.1:{port}")
        try:
            wait_http(f"{urls[-1]}/health", service.process, 600, service.log)
        except BaseException:
            for started in services:
                started.stop()
            raise
    return services, urls


async def unload_all(urls: list[str]) -> None:
    """Between policies: every adapter off both engines (the prompts differ too: no cache carries over)."""
    async with aiohttp.ClientSession() as session:
        for url in urls:
            listed = (await (await session.get(f"{url}/v1/models")).json())["data"]
            for model in listed:
                if model.get("parent") is not None:
                    await session.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": model["id"]})


# --- the workload and the two policies ----------------------------------------------------------------


class RoundRobin:
    """Each request to the next engine; the adapter loaded there first if it is not (once per engine)."""

    def __init__(self, urls: list[str], session: aiohttp.ClientSession) -> None:
        self.replicas = [Replica(url, healthy=True) for url in urls]
        self.session = session
        self.turn = itertools.cycle(self.replicas)
        self.loads: dict[tuple[str, str], asyncio.Task] = {}

    async def acquire(self, adapter: str, path: str, prefix: str) -> Replica:
        replica = next(self.turn)
        key = (replica.url, adapter)
        if key not in self.loads:
            self.loads[key] = asyncio.ensure_future(self._load(replica.url, adapter, path))
        await asyncio.shield(self.loads[key])
        return replica

    async def _load(self, url: str, adapter: str, path: str) -> None:
        async with self.session.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": adapter, "lora_path": path}
        ) as response:
            await response.read()

    def release(self, replica: Replica, adapter: str) -> None:
        pass


class Loragate:
    """The gateway's own Pool (replica set, picker, adapter loader), scraping every 0.5 s."""

    def __init__(self, urls: list[str], session: aiohttp.ClientSession) -> None:
        self.pool = Pool(urls, Metrics(CollectorRegistry()))
        self.pool.bind(AiohttpControl(session))
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.pool.start()

        async def scrape() -> None:
            while True:
                await asyncio.sleep(0.5)
                await self.pool.scrape_all()

        self.task = asyncio.create_task(scrape())

    async def acquire(self, adapter: str, path: str, prefix: str) -> Replica:
        return await self.pool.acquire(adapter, path, prefix=prefix)

    def release(self, replica: Replica, adapter: str) -> None:
        self.pool.release(replica, adapter)


async def conversation(
    policy,
    rng: random.Random,
    systems: list[str],
    adapters: list[tuple[str, str]],
    weights: list[float],
    session: aiohttp.ClientSession,
    deadline: float,
    results: list[tuple[float, float]],
    tokens: int,
    user_words: int,
    errors: list[int],
) -> None:
    while time.monotonic() < deadline:
        index = rng.choices(range(len(systems)), cum_weights=weights)[0]
        adapter, path = adapters[index % len(adapters)]
        messages = [{"role": "system", "content": systems[index]}]
        for _turn in range(rng.randint(2, 5)):
            if time.monotonic() >= deadline:
                return
            messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(user_words))})
            prefix = (systems[index] + "\x1e" + messages[1]["content"])[:256]
            replica = await policy.acquire(adapter, path, prefix)
            started = time.perf_counter()
            first = None
            answer = []
            try:
                async with session.post(
                    f"{replica.url}/v1/chat/completions",
                    json={
                        "model": adapter,
                        "messages": messages,
                        "max_tokens": tokens,
                        "temperature": 0,
                        "stream": True,
                        "ignore_eos": True,
                    },
                ) as response:
                    if response.status != 200:
                        errors.append(response.status)
                        break
                    async for line in response.content:
                        if line.startswith(b"data: ") and first is None:
                            first = time.perf_counter() - started
                        if line.startswith(b"data: {"):
                            delta = json.loads(line[6:])["choices"]
                            if delta and delta[0].get("delta", {}).get("content"):
                                answer.append(delta[0]["delta"]["content"])
            finally:
                policy.release(replica, adapter)
            results.append((first or 0.0, time.perf_counter() - started))
            messages.append({"role": "assistant", "content": "".join(answer)[:2000]})


async def measure(name: str, urls: list[str], model: dict, args, seed: int) -> dict:
    rng = random.Random(seed)
    systems = [
        f"System prompt {i}. " + " ".join(rng.choice(WORDS) for _ in range(args.system_words)) for i in range(16)
    ]
    adapters = list(model["adapters"].items())[:16]
    weights = list(itertools.accumulate(1 / (k**0.8) for k in range(1, len(systems) + 1)))
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        policy = RoundRobin(urls, session) if name == "round_robin" else Loragate(urls, session)
        if isinstance(policy, Loragate):
            await policy.start()
        before = [parse_engine_metrics(await (await session.get(f"{u}/metrics")).read()) for u in urls]
        results: list[tuple[float, float]] = []
        errors: list[int] = []
        started = time.monotonic()
        deadline = started + args.seconds
        await asyncio.gather(
            *(
                conversation(
                    policy,
                    random.Random(100 + i),
                    systems,
                    adapters,
                    weights,
                    session,
                    deadline,
                    results,
                    args.tokens,
                    args.user_words,
                    errors,
                )
                for i in range(args.clients)
            )
        )
        elapsed = time.monotonic() - started
        after = [parse_engine_metrics(await (await session.get(f"{u}/metrics")).read()) for u in urls]
        if isinstance(policy, Loragate) and policy.task is not None:
            policy.task.cancel()
    queries = sum((a.prefix_queries or 0) - (b.prefix_queries or 0) for a, b in zip(after, before))
    hits = sum((a.prefix_hits or 0) - (b.prefix_hits or 0) for a, b in zip(after, before))
    ttft = sorted(r[0] for r in results)
    return {
        "policy": name,
        "requests": len(results),
        "errors": len(errors),
        "throughput_rps": len(results) / elapsed,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))] if ttft else None,
        "prefix_cache_hit_rate": hits / queries if queries else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="two vLLM CPU engines on the tiny demo model")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "loragate-sched-gpu")
    args = parser.parse_args()
    cpu = args.cpu
    args.seconds = args.seconds or (40.0 if cpu else 45.0)
    args.clients = args.clients or (8 if cpu else 64)
    args.system_words = 60 if cpu else 1100  # ~1,500 tokens on the GPU model's tokenizer
    args.tokens = 16 if cpu else 64
    args.user_words = 10 if cpu else 30
    model_dir = args.model_dir.with_name(args.model_dir.name + ("-cpu" if cpu else ""))
    began = time.monotonic()
    model = build_model(model_dir, cpu=cpu, adapters=16)
    built_s = time.monotonic() - began
    rows = []
    log_dir = Path(tempfile.mkdtemp())
    services, urls = start_engines(model, cpu=cpu, log_dir=log_dir)
    try:
        for seed, name in enumerate(("round_robin", "loragate")):
            asyncio.run(unload_all(urls))
            rows.append(asyncio.run(measure(name, urls, model, args, seed)))
    finally:
        for service in services:
            service.stop()
    rr = rows[0]["throughput_rps"] or 1e-9
    print(f"{'policy':<12} {'req/s':>8} {'vs rr':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'prefix hits':>11}")
    for row in rows:
        row["vs_round_robin"] = row["throughput_rps"] / rr
        print(
            f"{row['policy']:<12} {row['throughput_rps']:>8.2f} {row['vs_round_robin']:>5.2f}x "
            f"{(row['ttft_p50_s'] or 0) * 1000:>7.0f}ms {(row['ttft_p99_s'] or 0) * 1000:>7.0f}ms "
            f"{(row['prefix_cache_hit_rate'] or 0):>10.0%}"
        )
    out = {
        "mode": "cpu" if cpu else "gpu",
        "rows": rows,
        "clients": args.clients,
        "seconds": args.seconds,
        "model_build_s": round(built_s, 1),
        "total_s": round(time.monotonic() - began, 1),
        "machine": {"cpus": os.cpu_count()},
    }
    name = "sched_real_cpu.json" if cpu else "sched_gpu.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
