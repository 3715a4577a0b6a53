"""Training throughput: loragate's plain PyTorch loop vs the transformers Trainer, same data, same steps.

Both fine-tune the same LoRA (continuing from the demo adapter a1) on the same license-text chat
rows with the same batches, loss on answer tokens only, one CPU thread, in this one process one
after the other. Prints tokens per CPU-second of each and the ratio (loop / Trainer).

    .venv/bin/python bench/train_backends.py [--steps 30] [--model-dir .cache/demo-model]

(TRL's SFTTrainer is a Trainer subclass: it would add a dependency and the same per-step machinery.)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.test_loop_train_eval import license_dataset  # noqa: E402  (real text from the disk)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache" / "demo-model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from loragate.pipeline.chatdata import Encoder, read_dataset
    from loragate.pipeline.trainloop import _collate

    torch.set_num_threads(args.threads)
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="loragate-train-bench-"))
    license_dataset(work / "data.jsonl")
    encoder = Encoder(manifest["base"])
    examples = [e for e in map(encoder.encode, read_dataset(work / "data.jsonl").rows) if e]
    batch, pad = 8, encoder.pad_id
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    batches = [[examples[order[(s * batch + i) % len(order)]] for i in range(batch)] for s in range(args.steps)]
    tokens = sum(len(e.prompt_ids) + len(e.answer_ids) for b in batches for e in b)

    def model():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(manifest["base"], dtype=torch.float32)
        return PeftModel.from_pretrained(base, manifest["adapters"]["a1"], is_trainable=True)

    def plain_loop() -> None:  # what loragate train runs
        m = model()
        params = [p for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0)
        for b in batches:
            ids, mask, labels = _collate(b, pad, torch)
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

    flat = [e for b in batches for e in b]

    def collate(items):
        ids, mask, labels = _collate(items, pad, torch)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def hf_trainer() -> None:  # the transformers Trainer over the same batches in the same order
        trainer = Trainer(
            model=model(),
            train_dataset=flat,
            data_collator=collate,
            args=TrainingArguments(
                output_dir=str(work / "trainer"),
                per_device_train_batch_size=batch,
                max_steps=args.steps,
                learning_rate=3e-2,
                weight_decay=0.0,
                max_grad_norm=1.0,
                lr_scheduler_type="constant",
                warmup_steps=0,
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
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(flat)  # same order
        trainer.train()

    # Alternating rounds; CPU time of this process is the figure (wall time moves with the neighbours).
    cpu = {"loop": 0.0, "trainer": 0.0}
    wall = {"loop": 0.0, "trainer": 0.0}
    for _ in range(args.rounds):
        for name, run in (("loop", plain_loop), ("trainer", hf_trainer)):
            c, w = time.process_time(), time.perf_counter()
            run()
            cpu[name] += time.process_time() - c
            wall[name] += time.perf_counter() - w
    tokens *= args.rounds
    loop_s, trainer_s = cpu["loop"], cpu["trainer"]
    loop_tps, trainer_tps = tokens / loop_s, tokens / trainer_s
    print(f"{args.rounds} x {args.steps} steps x {batch} rows, {tokens} tokens, {args.threads} thread(s); CPU seconds")
    print(f"plain loop           {loop_s:7.2f} s CPU ({wall['loop']:6.1f} s wall)  {loop_tps:8.0f} tokens/CPU-s")
    print(
        f"transformers Trainer {trainer_s:7.2f} s CPU ({wall['trainer']:6.1f} s wall)  {trainer_tps:8.0f} tokens/CPU-s"
    )
    print(f"ratio loop/Trainer  {loop_tps / trainer_tps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
