"""LoRA on an 8B-shaped base on one GPU, no network: bf16 LoRA vs QLoRA (a 4-bit NF4 base).

Builds a random-weight model with Llama-3.1-8B's shapes (hidden 4096, intermediate 14336, 32 layers,
32 heads, 8 KV heads, vocab 128256; 8.0 B parameters) in bf16 on the GPU and saves it (16 GB on local
disk; the tokenizer is the demo model's, built here, ids < 2000), then runs `loragate train` on it
twice as child processes with the same data and batches: ``--precision bf16`` and
``--quantization nf4``. Each card gives the peak GPU memory (torch.cuda.max_memory_allocated), the
estimate made before loading, and tokens/s (real tokens, the first step's warm-up included). The
ratio QLoRA / bf16 is printed for both figures. Meant to finish in under 8 minutes on an H100.

    .venv/bin/python bench/gpu/train.py [--steps 8] [--layers 32] [--out bench/results/gpu_train.json]

``--layers 2 --hidden 256`` makes a tiny model: a smoke test of the plumbing (on a CPU only the bf16
run is possible, and slow; QLoRA says it needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build(
    out: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, demo: Path
) -> float:
    code = f"""
import shutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(hidden_size={hidden}, intermediate_size={intermediate}, num_hidden_layers={layers},
                     num_attention_heads={heads}, num_key_value_heads={kv_heads}, vocab_size={vocab},
                     max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2)
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
with torch.device(device):
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
model.save_pretrained({str(out)!r}, max_shard_size="4GB")
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    try:
        shutil.copy({str(demo)!r} + "/" + name, {str(out)!r})
    except FileNotFoundError:
        pass
"""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return time.monotonic() - started


def dataset(path: Path, rows: int, words: int) -> None:
    import random

    text = Path("/usr/share/common-licenses/GPL-3").read_text().split()
    rng = random.Random(0)
    out = []
    for i in range(rows):
        start = rng.randrange(0, len(text) - 2 * words)
        prompt = f"Row {i}: continue " + " ".join(text[start : start + words])
        out.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": " ".join(text[start + words : start + 2 * words])},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--words", type=int, default=150, help="words per prompt and per answer (~400-600 tokens a row)"
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--work", type=Path, help="where the model is written (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_train.json")
    args = parser.parse_args()
    small = args.hidden < 4096
    shape = dict(
        hidden=args.hidden,
        intermediate=args.hidden * 14336 // 4096,
        layers=args.layers,
        heads=max(1, args.hidden // 128),
        kv_heads=max(1, args.hidden // 512),
        vocab=128256 if not small else 32000,
    )
    demo = ROOT / ".cache" / "demo-model" / "base"
    if not (demo / "tokenizer.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "loragate", "demo-model", str(demo.parent)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    work = args.work or Path(tempfile.mkdtemp(prefix="loragate-gpu-train-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    build_s = build(base, demo=demo, **shape)
    print(f"built the random base ({shape}) in {build_s:.0f} s", flush=True)
    dataset(work / "data.jsonl", rows=max(40, 2 * args.batch_size * args.steps), words=args.words)
    runs = {"bf16 LoRA": ["--precision", "bf16"], "QLoRA (nf4 base)": ["--precision", "bf16", "--quantization", "nf4"]}
    results = {}
    for index, (name, options) in enumerate(runs.items()):
        started = time.monotonic()
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "loragate",
                "train",
                "--dataset",
                str(work / "data.jsonl"),
                "--base-model",
                str(base),
                "--registry",
                str(work / "registry"),
                "--name",
                "gpu",
                "--version",
                f"r{index}",
                "--batch-size",
                str(args.batch_size),
                "--max-steps",
                str(args.steps),
                "--epochs",
                "1",
                "--checkpoint-every",
                "0",
                "--no-progress",
                "--lr",
                "2e-4",
                *options,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - started
        if run.returncode != 0:
            line = (run.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name:18} not run: {line}", flush=True)
            results[name] = {"options": options, "error": line}
            continue
        s = json.loads(run.stdout)
        results[name] = {
            "options": options,
            "peak_gpu_gb": s["memory_peak_gb"],
            "estimate_gb": s["memory_estimate_gb"],
            "tokens_per_s": s["tokens_per_s"],
            "micro_batch": s["micro_batch"],
            "gradient_checkpointing": s["gradient_checkpointing"],
            "steps": s["steps"],
            "train_s": s["duration_s"],
            "wall_s": round(wall, 1),
            "loss_first": s["loss_first"],
            "loss_last": s["loss_last"],
        }
        print(
            f"{name:18} peak {s['memory_peak_gb']:6.2f} GB (estimate {s['memory_estimate_gb']:6.2f})  "
            f"{s['tokens_per_s']:8.0f} tokens/s  micro-batch {s['micro_batch']}, checkpointing "
            f"{s['gradient_checkpointing']}  ({wall:.0f} s with loading)",
            flush=True,
        )
    a, b = results.get("bf16 LoRA", {}), results.get("QLoRA (nf4 base)", {})
    if "peak_gpu_gb" in a and "peak_gpu_gb" in b:
        print(
            f"QLoRA / bf16: memory x{b['peak_gpu_gb'] / a['peak_gpu_gb']:.2f}, "
            f"tokens/s x{b['tokens_per_s'] / a['tokens_per_s']:.2f}"
        )
    hardware = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if shutil.which("nvidia-smi")
        else "no GPU"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "hardware": hardware,
                "shape": shape,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "build_s": round(build_s, 1),
                "measured_at": time.time(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
