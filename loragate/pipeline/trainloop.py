"""The fine-tune itself (``fit``): a plain PyTorch loop (docs/loop.md says why not the transformers Trainer) with
the loss on answer tokens only: micro-batches accumulated to the effective batch, length-grouped, in bf16/fp16 on
GPUs, with gradient checkpointing and a 4-bit base (QLoRA) where asked, over one or many processes
(loragate/pipeline/distributed.py), checkpointed every N steps and on SIGTERM (loragate/pipeline/checkpoint.py).
It runs what loragate/pipeline/trainprep.py prepared; torch is imported only here, and only when it runs.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from loragate.common.adaptercard import TrainingRun
from loragate.common.registry import CONFIG_FILE
from loragate.pipeline import checkpoint, distributed, memory
from loragate.pipeline.batches import epoch_plan
from loragate.pipeline.chatdata import Encoder, Example
from loragate.pipeline.hardware import GB, Hardware
from loragate.pipeline.trainprep import Prepared, TrainConfig, TrainError

LOSS_LOG_FILE = "train_log.jsonl"


class TrainInterrupted(TrainError):
    """SIGTERM: the run saved a checkpoint and stopped; the same command resumes it."""


def fit(prepared: Prepared, work: Path, loss_log: Path) -> TrainingRun:
    """The fine-tune itself: micro-batches accumulated to the effective batch, loss on answer tokens only."""
    import torch
    from tqdm import tqdm

    config, plan, world = prepared.config, prepared.plan, prepared.world
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(f"cuda:{world.local_rank}" if plan.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    group = distributed.Group(world, torch, device)
    try:
        model = _load_model(config, plan, device, torch)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        scaler = torch.amp.GradScaler("cuda") if plan.precision == "fp16" else None
        fingerprint = _fingerprint(prepared)
        progress = checkpoint.Progress(fingerprint=fingerprint)
        last = checkpoint.latest(work) if config.resume else None
        if last is not None:
            progress, state = checkpoint.load(last, torch=torch, rank=world.rank)
            if progress.fingerprint != fingerprint:
                raise TrainError(
                    f"the checkpoint {last} is from a run with other data or options (dataset, seed, "
                    "batch sizes, learning rate, adapter): run the same command to resume it, or "
                    "add --no-resume to start over"
                )
            with torch.no_grad():
                for n, p in named:
                    p.copy_(state["trainable"][n].to(p.device))
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state["scaler"] is not None:
                scaler.load_state_dict(state["scaler"])
            progress.resumed_from.append(progress.step)
        losses = _loss_log_upto(loss_log, progress.step) if world.main else []
        pad = Encoder(config.base_model, plan.seq_len).pad_id
        examples = prepared.train_examples
        scored = [_scored(e) for e in examples]
        plans: dict[int, Any] = {}  # epoch -> steps (a pure function of the seed: batches.py)

        def steps_of(epoch: int) -> Any:
            if epoch not in plans:
                plans[epoch] = epoch_plan(
                    [len(e.prompt_ids) + len(e.answer_ids) for e in examples],
                    seed=config.seed,
                    epoch=epoch,
                    micro_batch=plan.micro_batch,
                    accumulation=prepared.accumulation,
                    world=world.size,
                    group_by_length=config.group_by_length,
                )
            return plans[epoch]

        total = sum(len(steps_of(e)) for e in range(config.epochs))
        if config.max_steps:
            total = min(total, config.max_steps)
        autocast = torch.autocast(
            device.type,
            dtype=torch.bfloat16 if plan.precision == "bf16" else torch.float16,
            enabled=plan.precision != "fp32",
        )
        stop = _StopSignal()
        started = time.monotonic()
        log = open(loss_log, "a") if world.main else None  # noqa: SIM115  (closed below, main process only)
        bar = tqdm(
            total=total,
            initial=progress.step,
            file=sys.stderr,
            unit="step",
            desc=f"train {config.name}/{config.version}",
            disable=not (config.progress and world.main),
        )
        try:
            while progress.epoch < config.epochs and progress.step < total:
                steps = steps_of(progress.epoch)
                while progress.step_in_epoch < len(steps) and progress.step < total:
                    step = steps[progress.step_in_epoch]
                    denominator = sum(scored[i] for mb in step.micro_batches for i in mb) or 1
                    items = torch.tensor(denominator, device=device)
                    local_loss = local_tokens = local_answer = 0.0
                    for micro in step.for_rank(world.rank, world.size):
                        ids, mask, labels = (t.to(device) for t in _collate([examples[i] for i in micro], pad, torch))
                        with autocast:  # the model's own loss: shifted labels, float32, summed / the step's tokens
                            loss = model(
                                input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items
                            ).loss
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                        local_loss += float(loss.detach()) * denominator
                        local_tokens += float(mask.sum())
                        local_answer += float((labels[:, 1:] != -100).sum())
                        del loss
                    group.sum_gradients(params)
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step_loss, step_tokens, step_answer = group.sum([local_loss, local_tokens, local_answer])
                    value = step_loss / denominator
                    progress.step += 1
                    progress.step_in_epoch += 1
                    progress.all_tokens += int(step_tokens)
                    progress.answer_tokens += int(step_answer)
                    losses.append(value)
                    elapsed = progress.elapsed_s + time.monotonic() - started
                    if log is not None:
                        log.write(
                            json.dumps(
                                {
                                    "step": progress.step,
                                    "epoch": progress.epoch,
                                    "loss": round(value, 6),
                                    "answer_tokens": progress.answer_tokens,
                                    "elapsed_s": round(elapsed, 3),
                                }
                            )
                            + "\n"
                        )
                        log.flush()
                    bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{progress.all_tokens / max(elapsed, 1e-9):.0f}")
                    bar.update(1)
                    out_of_time = bool(config.time_budget_s and elapsed >= config.time_budget_s)
                    stopping, out_of_time = group.any(stop.requested), group.any(out_of_time)
                    if stopping or (config.checkpoint_every and progress.step % config.checkpoint_every == 0):
                        saved = replace(progress, elapsed_s=elapsed, resumed_from=list(progress.resumed_from))
                        trainable = {n: p.detach().to("cpu", copy=True) for n, p in named}
                        where = checkpoint.save(
                            work,
                            saved,
                            torch=torch,
                            trainable=trainable,
                            optimizer=optimizer,
                            scaler=scaler,
                            rank=world.rank,
                            barrier=group.barrier,
                        )
                        if stopping:
                            raise TrainInterrupted(
                                f"stopped by SIGTERM at step {progress.step}; checkpoint {where}: "
                                "run the same command to resume"
                            )
                    if out_of_time:
                        total = progress.step
                if progress.step_in_epoch >= len(steps):
                    progress.epoch += 1
                    progress.step_in_epoch = 0
        finally:
            stop.restore()
            bar.close()
            if log is not None:
                log.close()
        duration = progress.elapsed_s + time.monotonic() - started
        peak = (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        if world.main:
            model.save_pretrained(work)
            adapter_config = work / CONFIG_FILE
            saved_config = json.loads(adapter_config.read_text())
            saved_config["base_model_name_or_path"] = prepared.base.path  # vLLM reads it for display only
            adapter_config.write_text(json.dumps(saved_config, indent=2))
        group.barrier()
    finally:
        group.close()
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    return TrainingRun(
        command=config.command,
        seed=config.seed,
        duration_s=round(duration, 3),
        backend=f"torch-loop/{device.type}",
        epochs=min(progress.epoch + (progress.step_in_epoch > 0), config.epochs),
        steps=progress.step,
        tokens=progress.answer_tokens,
        tokens_per_s=round(progress.all_tokens / max(duration, 1e-9), 1),
        loss_first=round(sum(head) / len(head), 5) if losses else None,
        loss_last=round(sum(tail) / len(tail), 5) if losses else None,
        loss_min=round(min(losses), 5) if losses else None,
        loss_log=LOSS_LOG_FILE,
        precision=plan.precision,
        quantization=plan.quantization,
        effective_batch=prepared.effective_batch,
        micro_batch=plan.micro_batch,
        accumulation=prepared.accumulation,
        processes=world.size,
        gradient_checkpointing=plan.gradient_checkpointing,
        max_len=plan.seq_len,
        checkpoints_resumed=progress.resumed_from,
        hardware=_hardware_text(prepared.hardware, world, device.type),
        memory_estimate_gb=round(prepared.estimate.total / GB, 2),
        memory_peak_gb=round(peak / GB, 2),
    )


def _fingerprint(prepared: Prepared) -> str:
    """What the sequence of steps depends on; the epochs, step limits and process count may change."""
    import hashlib

    c, p = prepared.config, prepared.plan
    what = [
        prepared.dataset.sha256,
        prepared.base.sha256,
        prepared.parent_ref,
        c.seed,
        c.held_out_share,
        prepared.effective_batch,
        p.micro_batch,
        c.group_by_length,
        c.lr,
        p.rank,
        list(p.targets),
        c.alpha,
        p.seq_len,
        p.precision,
        p.quantization,
    ]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _load_model(config: TrainConfig, plan: memory.Plan, device: Any, torch: Any) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.precision]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if plan.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if plan.precision != "fp32" else torch.bfloat16,
        )
    if device.type == "cuda":  # straight onto the GPU: an 8B base never passes through host memory whole
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)
    model.config.use_cache = False
    if plan.gradient_checkpointing:  # HF applies it in train() mode only (FIELD-NOTES)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        if config.parent:
            model = PeftModel.from_pretrained(model, config.parent, is_trainable=True)
        else:
            model = get_peft_model(
                model,
                LoraConfig(
                    r=config.rank,
                    lora_alpha=config.alpha,
                    lora_dropout=0.0,
                    target_modules=list(config.target_modules),
                    task_type="CAUSAL_LM",
                ),
            )
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatch: the adapter is for another base
        raise TrainError(f"cannot apply the adapter to {config.base_model}: {str(exc)[:300]}") from None
    if plan.quantization is None:  # (a 4-bit model refuses .to(); its adapter is created on its device)
        model.to(device)
    for p in model.parameters():  # the adapter trains in float32 whatever the base's dtype
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.train()
    return model


def _scored(e: Example) -> int:
    """Answer tokens the loss sees: each is predicted from the one before it."""
    return len(e.answer_ids) - (0 if e.prompt_ids else 1)


def _loss_log_upto(path: Path, steps: int) -> list[float]:
    """A resumed run's loss log: the lines up to its checkpoint's step (later ones are trained again)."""
    lines = path.read_text().splitlines()[:steps] if path.is_file() else []
    path.write_text("".join(line + "\n" for line in lines))
    return [json.loads(line)["loss"] for line in lines]


def _hardware_text(hardware: Hardware, world: distributed.World, device: str) -> str:
    if device == "cuda":
        return f"{world.size} x {hardware.name} ({hardware.memory_total / GB:.0f} GB)"
    return f"{world.size} process(es) on {hardware.name}"


class _StopSignal:
    """SIGTERM (an eviction, a deadline) asks the loop to checkpoint and stop at the end of the step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, periodic checkpoints only
            pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _collate(batch: list[Example], pad: int, torch: Any) -> tuple[Any, Any, Any]:
    length = max(len(e.prompt_ids) + len(e.answer_ids) for e in batch)
    ids = torch.full((len(batch), length), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        seq = e.prompt_ids + e.answer_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(e.prompt_ids) : len(seq)] = torch.tensor(e.answer_ids)
    return ids, mask, labels
