"""Training memory and speed on a model of real shape: today's loop vs each option, on this CPU.

A random-weight Llama with Llama's layer shapes (hidden 1024, intermediate 2816, 8 layers, 16 heads,
8 KV heads, vocab 32000: 0.16 B parameters; 16 layers (0.25 B) took 7.5 GB in today's loop, over the ~5 GB a run
may take here), LoRA r=8 on
q/k/v/o, a fixed dataset of chat rows of 60-200 tokens, the same effective batch (8 rows a step),
the same steps. Each configuration is one `loragate train` child process; its card gives the
measured peak RSS (ru_maxrss) and real (unpadded) tokens per second, beside the estimate that
`loragate train` made before loading (loragate/pipeline/memory.py).

"today" is the loop as it was (micro-batch 8, no checkpointing, rows in shuffled order padded to
the batch's longest): the same loop with those options. bf16 is not run: on this CPU it is more
than 5x slower than fp32 (FIELD-NOTES); its savings are measured on a GPU (bench/gpu/train.py).

    .venv/bin/python bench/train_memory.py [--steps 2] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> loragate train options (all: --batch-size 8)
    "today": ["--micro-batch-size", "8", "--gradient-checkpointing", "off", "--no-group-by-length"],
    "checkpointing": ["--micro-batch-size", "8", "--gradient-checkpointing", "on", "--no-group-by-length"],
    "accumulation (micro 2)": ["--micro-batch-size", "2", "--gradient-checkpointing", "off", "--no-group-by-length"],
    "both (micro 2)": ["--micro-batch-size", "2", "--gradient-checkpointing", "on", "--no-group-by-length"],
    "grouped (micro 8)": ["--micro-batch-size", "8", "--gradient-checkpointing", "off"],
    "default (CPU)": [],
}
TRAINER = {  # the field's stack on the same model, rows and effective batch: the transformers Trainer + PEFT
    "Trainer (micro 8)": {"micro": 8, "checkpointing": False},
    "Trainer (micro 1, accumulation 8)": {"micro": 1, "checkpointing": False},
}


def trainer_child(base: str, data: str, options: dict, steps: int) -> dict:
    """The transformers Trainer (TRL's SFTTrainer is a subclass) with PEFT LoRA r=8 on q/k/v/o, the same
    encoded rows, answer-only labels and batches (loragate's plan for today's options, in order) as
    loragate train, in this process; its peak RSS and tokens/s (tokens counted as the model sees them:
    accelerate's loader reads a batch ahead)."""
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from loragate.pipeline.batches import epoch_plan
    from loragate.pipeline.chatdata import Encoder, read_dataset, split
    from loragate.pipeline.trainloop import _collate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoder = Encoder(base, 2048)
    rows, _ = split(read_dataset(data).rows, 0.2, 0)
    encoded = [e for e in map(encoder.encode, rows) if e]
    plan = epoch_plan(
        [len(e.prompt_ids) + len(e.answer_ids) for e in encoded],
        seed=0,
        epoch=0,
        micro_batch=options["micro"],
        accumulation=8 // options["micro"],
        world=1,
        group_by_length=False,
    )
    examples = [encoded[i] for step in plan for micro in step.micro_batches for i in micro]  # loragate's order
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    )
    tokens = []
    model.register_forward_pre_hook(lambda m, a, kw: tokens.append(int(kw["attention_mask"].sum())), with_kwargs=True)

    def collate(items):
        ids, mask, labels = _collate(items, encoder.pad_id, torch)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    trainer = Trainer(
        model=model,
        train_dataset=examples,
        data_collator=collate,
        args=TrainingArguments(
            output_dir=tempfile.mkdtemp(),
            per_device_train_batch_size=options["micro"],
            gradient_accumulation_steps=8 // options["micro"],
            gradient_checkpointing=options["checkpointing"],
            max_steps=steps,
            learning_rate=2e-4,
            weight_decay=0.0,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            remove_unused_columns=False,
            seed=0,
        ),
    )
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(examples)  # the same batches
    started = time.monotonic()
    trainer.train()
    duration = time.monotonic() - started
    return {
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3, 2),
        "tokens_per_s": round(sum(tokens) / duration, 1),
    }


def build_model(out: Path, layers: int, demo_base: Path) -> None:
    code = f"""
import torch, shutil
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers={layers}, num_attention_heads=16,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2)
LlamaForCausalLM(config).save_pretrained({str(out)!r})
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    src = {str(demo_base)!r} + "/" + name
    try:
        shutil.copy(src, {str(out)!r})
    except FileNotFoundError:
        pass
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def dataset(path: Path, rows: int = 40) -> None:
    import random

    words = Path("/usr/share/common-licenses/GPL-3").read_text().split()
    rng = random.Random(0)
    out = []
    for i in range(rows):
        n = rng.randint(20, 90)  # ~60-200 tokens a row with the demo tokenizer
        start = rng.randrange(0, len(words) - 2 * n)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"Row {i}: continue " + " ".join(words[start : start + n])},
                    {"role": "assistant", "content": " ".join(words[start + n : start + 2 * n])},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--demo-base", type=Path, default=ROOT / ".cache" / "demo-model" / "base")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_memory.json")
    parser.add_argument("--only", action="append", help="run only these configurations (repeat)")
    parser.add_argument("--trainer-child", nargs=3, metavar=("BASE", "DATA", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer_child:
        base_dir, data, options = args.trainer_child
        print(json.dumps(trainer_child(base_dir, data, json.loads(options), args.steps)))
        return 0
    if not (args.demo_base / "tokenizer.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "loragate", "demo-model", str(args.demo_base.parent)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    work = Path(tempfile.mkdtemp(prefix="loragate-train-memory-"))
    base = work / "base"
    build_model(base, args.layers, args.demo_base)
    dataset(work / "data.jsonl")
    params = json.loads((base / "config.json").read_text())
    results = {}
    for index, (name, options) in enumerate(CONFIGS.items()):
        if args.only and name not in args.only:
            continue
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
                "bench",
                "--version",
                f"c{index}",
                "--batch-size",
                "8",
                "--max-steps",
                str(args.steps),
                "--epochs",
                "1",
                "--seed",
                "0",
                "--no-progress",
                "--checkpoint-every",
                "0",
                *options,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            print(f"{name}: failed: {run.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        summary = json.loads(run.stdout)
        results[name] = {
            "options": options,
            "peak_rss_gb": summary["memory_peak_gb"],
            "estimate_gb": summary["memory_estimate_gb"],
            "tokens_per_s": summary["tokens_per_s"],
            "micro_batch": summary["micro_batch"],
            "checkpointing": summary["gradient_checkpointing"],
            "loss_first": summary["loss_first"],
            "wall_s": round(time.monotonic() - started, 1),
        }
        print(
            f"{name:24} peak {summary['memory_peak_gb']:5.2f} GB (estimate {summary['memory_estimate_gb']:5.2f})  "
            f"{summary['tokens_per_s']:7.1f} tokens/s",
            flush=True,
        )
    for name, options in TRAINER.items():
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        run = subprocess.run(
            [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--trainer-child",
                str(base),
                str(work / "data.jsonl"),
                json.dumps(options),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            print(f"{name}: failed: {run.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        results[name] = {"options": options, **measured, "wall_s": round(time.monotonic() - started, 1)}
        print(
            f"{name:24} peak {measured['peak_rss_gb']:5.2f} GB                    "
            f"{measured['tokens_per_s']:7.1f} tokens/s",
            flush=True,
        )
    today = results.get("today")
    print(
        f"\nmodel: hidden 1024, intermediate 2816, {args.layers} layers, vocab 32000; batch 8, {args.steps} steps, "
        "fp32, 1 thread; ratios to today's loop (same run):"
    )
    for name, r in results.items():
        if today:
            r["memory_ratio"] = round(r["peak_rss_gb"] / today["peak_rss_gb"], 3)
            r["speed_ratio"] = round(r["tokens_per_s"] / today["tokens_per_s"], 3)
            print(f"{name:24} memory x{r['memory_ratio']:.2f}  tokens/s x{r['speed_ratio']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": {
                    k: params[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
                },
                "steps": args.steps,
                "batch": 8,
                "threads": 1,
                "measured_at": time.time(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
