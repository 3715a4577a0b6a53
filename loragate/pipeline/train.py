"""LoRA fine-tuning on chat JSONL, continuing from a parent adapter or fresh; the result is a registry card.

``prepare`` checks everything that can be checked cheaply (registry writable, version free,
usable rows, base model and parent agree) before torch is imported; ``fit`` is a plain PyTorch
loop (measured faster than the transformers Trainer on the demo model, see docs/loop.md) with the
loss on answer tokens only; ``train`` runs both in a work directory inside the registry and
registers the result in one rename, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loragate.common.registry import (
    CARD_FILE,
    CONFIG_FILE,
    AdapterCard,
    BaseModelRef,
    CardMismatch,
    Registry,
    RegistryError,
    TrainingData,
    TrainingRun,
    base_model_ref,
    new_card,
    read_card,
    verify,
)
from loragate.pipeline.chatdata import Dataset, DatasetError, Encoder, Example, read_dataset, split, write_rows

HELD_OUT_FILE = "heldout.jsonl"
LOSS_LOG_FILE = "train_log.jsonl"


class TrainError(Exception):
    """Bad input for a training run; the message says what to fix."""


@dataclass
class TrainConfig:
    dataset: str
    base_model: str
    registry: str
    name: str
    version: str
    parent: str | None = None
    seed: int = 0
    held_out_share: float = 0.2
    epochs: int = 3
    max_steps: int | None = None
    time_budget_s: float | None = None  # stop after this much training time (the run is still complete)
    batch_size: int = 8
    lr: float = 2e-4  # typical for LoRA on a real model; the random-weight demo model needs ~3e-2
    rank: int = 8  # fresh adapters only; a parent's config is kept
    alpha: float = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_len: int = 256
    window_start: float | None = None
    window_end: float | None = None
    trigger: dict[str, Any] | None = None
    command: list[str] = field(default_factory=list)
    threads: int | None = 1  # CPU threads; measured: one is ~10x faster than two on a busy 2-core VM
    progress: bool = True


@dataclass
class Prepared:
    config: TrainConfig
    registry: Registry
    target: Path
    base: BaseModelRef
    dataset: Dataset
    train_rows: list
    held_rows: list
    train_examples: list[Example]
    parent_ref: str | None


def prepare(config: TrainConfig) -> Prepared:
    """Every check that needs no torch: fails in a second, before any training."""
    try:
        registry = Registry(config.registry)
        target = registry.directory(config.name, config.version)
        if target.exists():
            raise TrainError(f"{config.name}/{config.version} already exists in {config.registry}")
        registry.check_writable()
        base = base_model_ref(config.base_model)
    except RegistryError as exc:
        raise TrainError(str(exc)) from None
    parent_ref = _check_parent(config.parent, base) if config.parent else None
    try:
        dataset = read_dataset(config.dataset)
        if not dataset.rows:
            raise TrainError(f"dataset {config.dataset}: no usable rows ({dataset.skipped} line(s) without a "
                             "user prompt and a non-empty assistant answer)")
        train_rows, held_rows = split(dataset.rows, config.held_out_share, config.seed)
        encoder = Encoder(config.base_model, config.max_len)
    except DatasetError as exc:
        raise TrainError(str(exc)) from None
    examples = [e for e in map(encoder.encode, train_rows) if e is not None]
    if not examples:
        raise TrainError(f"dataset {config.dataset}: no training row fits in {config.max_len} tokens")
    return Prepared(config, registry, target, base, dataset, train_rows, held_rows, examples, parent_ref)


def _check_parent(parent: str, base: BaseModelRef) -> str:
    """The parent adapter must have been trained on this base model (its card's hash, else its config)."""
    directory = Path(parent)
    if not (directory / CONFIG_FILE).is_file():
        raise TrainError(f"parent adapter {parent}: no {CONFIG_FILE} there")
    if (directory / CARD_FILE).is_file():
        try:
            card = read_card(directory)
            verify(card, directory)
        except (RegistryError, CardMismatch) as exc:
            raise TrainError(f"parent adapter: {exc}") from None
        if card.base.sha256 != base.sha256:
            raise TrainError(f"parent adapter {card.ref} was trained on base model {card.base.name} "
                             f"(sha256 {card.base.sha256[:16]}...), not on {base.path} (sha256 {base.sha256[:16]}...)")
        return card.ref
    config = json.loads((directory / CONFIG_FILE).read_text())
    made_for = config.get("base_model_name_or_path")
    if not made_for or Path(made_for).resolve() != Path(base.path or "").resolve():
        raise TrainError(f"parent adapter {parent} has no card and names base model {made_for!r}, not "
                         f"{base.path}: register it first (loragate adapters register) or pick the matching base")
    return str(directory.resolve())


def fit(prepared: Prepared, out_dir: Path, loss_log: Path) -> TrainingRun:
    """The fine-tune itself: a plain PyTorch loop over padded batches, loss on answer tokens only."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    config = prepared.config
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.float32)
    try:
        if config.parent:
            model = PeftModel.from_pretrained(model, config.parent, is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                     target_modules=list(config.target_modules),
                                                     task_type="CAUSAL_LM"))
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatch: the adapter is for another base
        raise TrainError(f"cannot apply the adapter to {config.base_model}: {str(exc)[:300]}") from None
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    pad = Encoder(config.base_model, config.max_len).pad_id

    examples = prepared.train_examples
    per_epoch = math.ceil(len(examples) / config.batch_size)
    total = per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    order = random.Random(config.seed)
    losses: list[float] = []
    step = answer_tokens = all_tokens = 0
    started = time.monotonic()
    with open(loss_log, "w") as log, tqdm(total=total, file=sys.stderr, desc=f"train {config.name}/{config.version}",
                                         unit="step", disable=not config.progress) as bar:
        for epoch in range(config.epochs):
            batch_order = list(range(len(examples)))
            order.shuffle(batch_order)
            for start in range(0, len(batch_order), config.batch_size):
                if step >= total or (config.time_budget_s and time.monotonic() - started >= config.time_budget_s):
                    break
                batch = [examples[i] for i in batch_order[start:start + config.batch_size]]
                ids, mask, labels = (t.to(device) for t in _collate(batch, pad, torch))
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                step += 1
                answer_tokens += int((labels != -100).sum())
                all_tokens += int(mask.sum())
                value = float(loss.detach())
                losses.append(value)
                elapsed = time.monotonic() - started
                log.write(json.dumps({"step": step, "epoch": epoch, "loss": round(value, 5),
                                      "answer_tokens": answer_tokens, "elapsed_s": round(elapsed, 3)}) + "\n")
                bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{all_tokens / max(elapsed, 1e-9):.0f}")
                bar.update(1)
    duration = time.monotonic() - started
    model.save_pretrained(out_dir)
    adapter_config = out_dir / CONFIG_FILE
    saved = json.loads(adapter_config.read_text())
    saved["base_model_name_or_path"] = prepared.base.path  # vLLM reads it for display only
    adapter_config.write_text(json.dumps(saved, indent=2))
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    return TrainingRun(command=config.command, seed=config.seed, duration_s=round(duration, 3),
                       backend=f"torch-loop/{device.type}", epochs=epoch + 1 if losses else 0, steps=step, tokens=answer_tokens,
                       tokens_per_s=round(all_tokens / max(duration, 1e-9), 1),
                       loss_first=round(sum(head) / len(head), 5) if losses else None,
                       loss_last=round(sum(tail) / len(tail), 5) if losses else None,
                       loss_min=round(min(losses), 5) if losses else None, loss_log=LOSS_LOG_FILE)


def _collate(batch: list[Example], pad: int, torch):
    length = max(len(e.prompt_ids) + len(e.answer_ids) for e in batch)
    ids = torch.full((len(batch), length), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        seq = e.prompt_ids + e.answer_ids
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, len(e.prompt_ids):len(seq)] = torch.tensor(e.answer_ids)
    return ids, mask, labels


def train(config: TrainConfig) -> tuple[Path, AdapterCard]:
    """Prepare, fit and register; returns the new version's directory and card (state: candidate)."""
    prepared = prepare(config)
    work = Path(tempfile.mkdtemp(dir=prepared.registry.root, prefix=f".train-{config.name}-{config.version}-"))
    try:
        held_sha = write_rows(prepared.held_rows, work / HELD_OUT_FILE)
        run = fit(prepared, work, work / LOSS_LOG_FILE)
        data = TrainingData(location=str(Path(config.dataset).resolve()) if "://" not in config.dataset
                            else config.dataset, sha256=prepared.dataset.sha256, rows=len(prepared.dataset.rows),
                            train_rows=len(prepared.train_rows), held_out_rows=len(prepared.held_rows),
                            held_out_location=str((prepared.target / HELD_OUT_FILE).resolve()),
                            held_out_sha256=held_sha, window_start=config.window_start,
                            window_end=config.window_end, trigger=config.trigger)
        card = new_card(config.name, config.version, work, prepared.base, parent=prepared.parent_ref, data=data,
                        training=run)
        target = prepared.registry.register(card, work, reason="trained", extra_files=(HELD_OUT_FILE, LOSS_LOG_FILE))
    except RegistryError as exc:
        raise TrainError(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target, read_card(target)
