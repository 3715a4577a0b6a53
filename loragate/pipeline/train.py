"""LoRA fine-tuning on chat JSONL, continuing from a parent adapter or fresh; the result is a registry card.

``prepare`` checks everything that can be checked cheaply (registry writable, version free,
usable rows, base model and parent agree, the options fit the hardware, and the memory estimate
fits the device: loragate/pipeline/memory.py) before torch is imported. ``fit`` is a plain PyTorch
loop (docs/loop.md says why not the transformers Trainer) with the loss on answer tokens only:
micro-batches accumulated to the effective batch, length-grouped, in bf16/fp16 on GPUs, with
gradient checkpointing and a 4-bit base (QLoRA) where asked, over one or many processes
(loragate/pipeline/distributed.py), checkpointed every N steps and on SIGTERM
(loragate/pipeline/checkpoint.py). ``train`` runs it in the version's work directory inside the
registry (``.train-NAME-VERSION``): the same command run again resumes from its last checkpoint;
the result is registered in one rename, and the work directory goes only then.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
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
from loragate.pipeline import checkpoint, distributed, memory
from loragate.pipeline.batches import epoch_plan
from loragate.pipeline.chatdata import Dataset, DatasetError, Encoder, Example, read_dataset, split, write_rows
from loragate.pipeline.hardware import GB, Hardware, probe

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
    batch_size: int = 8  # the effective batch: rows per optimizer step over all processes
    micro_batch_size: int | None = None  # rows per forward pass; None: the largest that fits (CPU: CPU_MICRO_BATCH)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 on GPUs that have it, else fp16; CPU fp32)
    quantization: str | None = None  # nf4: a 4-bit base (QLoRA), CUDA only
    gradient_checkpointing: str = "auto"  # auto | on | off (auto: on where the batch does not fit without it)
    group_by_length: bool = True
    lr: float = 2e-4  # typical for LoRA on a real model; the random-weight demo model needs ~3e-2
    rank: int = 8  # fresh adapters only; a parent's config is kept
    alpha: float = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_len: int = 2048  # the cap: rows are cut to it (and to the model's positions); batches pad to their longest
    checkpoint_every: int = 100  # steps; 0: only on SIGTERM
    resume: bool = True  # continue from the work directory's last checkpoint where there is one
    memory_limit_gb: float | None = None  # default: the device's free memory (CPU: available RAM, per process)
    window_start: float | None = None
    window_end: float | None = None
    trigger: dict[str, Any] | None = None
    command: list[str] = field(default_factory=list)
    threads: int | None = 1  # CPU threads; measured: one is ~10x faster than two on a busy 2-core VM
    progress: bool = True


CPU_MICRO_BATCH = 1  # bench/train_memory.py: the least memory, no slower than larger micro-batches on a CPU
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
    hardware: Hardware
    world: distributed.World
    plan: memory.Plan  # the resolved options (precision, quantization, micro-batch, checkpointing, length)
    accumulation: int
    estimate: memory.Estimate

    @property
    def effective_batch(self) -> int:
        return self.plan.micro_batch * self.accumulation * self.world.size


def prepare(config: TrainConfig, hardware: Hardware | None = None, world: distributed.World | None = None) -> Prepared:
    """Every check that needs no torch: fails in a second, before any training."""
    try:
        registry = Registry(config.registry)
        target = registry.directory(config.name, config.version)
        if target.exists():
            raise TrainError(f"{config.name}/{config.version} already exists in {config.registry}")
        registry.check_writable()
        base = base_model_ref(config.base_model)
        shape = memory.ModelShape.from_config(config.base_model)
    except (RegistryError, memory.ConfigError) as exc:
        raise TrainError(str(exc)) from None
    hardware = hardware or probe()
    world = world or distributed.from_env()
    _check_options(config, hardware)
    parent_ref = _check_parent(config.parent, base) if config.parent else None
    try:
        dataset = read_dataset(config.dataset)
        if not dataset.rows:
            raise TrainError(f"dataset {config.dataset}: no usable rows ({dataset.skipped} line(s) without a "
                             "user prompt and a non-empty assistant answer)")
        train_rows, held_rows = split(dataset.rows, config.held_out_share, config.seed)
        encoder = Encoder(config.base_model, _max_len(config))
    except DatasetError as exc:
        raise TrainError(str(exc)) from None
    examples = [e for e in map(encoder.encode, train_rows) if e is not None]
    if not examples:
        raise TrainError(f"dataset {config.dataset}: no training row fits in {config.max_len} tokens")
    seq_len = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    plan, accumulation, estimate = _fit_memory(config, shape, hardware, world, seq_len)
    return Prepared(config, registry, target, base, dataset, train_rows, held_rows, examples, parent_ref, hardware,
                    world, plan, accumulation, estimate)


def _max_len(config: TrainConfig) -> int:
    """The cap on a row's tokens: --max-len, and never beyond the model's positions."""
    try:
        positions = json.loads((Path(config.base_model) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        positions = None
    return min(config.max_len, int(positions)) if positions else config.max_len


def _check_options(config: TrainConfig, hardware: Hardware) -> None:
    if config.precision not in PRECISIONS:
        raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, not {config.precision!r}")
    if config.gradient_checkpointing not in ("auto", "on", "off"):
        raise TrainError(f"--gradient-checkpointing must be auto, on or off, not {config.gradient_checkpointing!r}")
    if config.quantization not in (None, "nf4"):
        raise TrainError(f"--quantization must be nf4 (or left out), not {config.quantization!r}")
    if config.quantization == "nf4" and hardware.device != "cuda":
        raise TrainError("--quantization nf4 (QLoRA) needs a CUDA GPU (bitsandbytes 4-bit); this machine has none")
    if config.quantization == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise TrainError("--quantization nf4 needs bitsandbytes: pip install 'loragate[train]'")
    if config.precision == "fp16" and hardware.device != "cuda":
        raise TrainError("--precision fp16 needs a CUDA GPU (use fp32 or bf16 on a CPU)")
    if config.batch_size < 1 or (config.micro_batch_size is not None and config.micro_batch_size < 1):
        raise TrainError("--batch-size and --micro-batch-size must be at least 1")


def _precision(config: TrainConfig, hardware: Hardware) -> str:
    if config.precision != "auto":
        return config.precision
    if hardware.device == "cuda":
        return "bf16" if hardware.bf16 else "fp16"
    return "fp32"  # bf16 on a CPU without AMX is >5x slower (FIELD-NOTES)


def _lora_shape(config: TrainConfig) -> tuple[int, tuple[str, ...]]:
    if config.parent:
        try:
            saved = json.loads((Path(config.parent) / CONFIG_FILE).read_text())
            targets = saved.get("target_modules") or list(config.target_modules)
            return int(saved.get("r") or config.rank), tuple([targets] if isinstance(targets, str) else targets)
        except (OSError, ValueError):
            pass
    return config.rank, config.target_modules


def _fit_memory(config: TrainConfig, shape: memory.ModelShape, hardware: Hardware, world: distributed.World,
                seq_len: int) -> tuple[memory.Plan, int, memory.Estimate]:
    """Resolve micro-batch and checkpointing ("auto") against the memory budget; refuse a run that cannot fit."""
    per_process = max(1, math.ceil(config.batch_size / world.size))
    rank, targets = _lora_shape(config)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if hardware.device == "cpu" else 1  # they share the RAM
    budget = config.memory_limit_gb * GB if config.memory_limit_gb else hardware.memory_free / max(1, local)
    plan = memory.Plan(device=hardware.device, precision=_precision(config, hardware),
                       quantization=config.quantization, micro_batch=config.micro_batch_size or per_process,
                       seq_len=seq_len, gradient_checkpointing=config.gradient_checkpointing == "on",
                       rank=rank, targets=targets)
    if config.micro_batch_size is None and hardware.device == "cpu":
        plan = replace(plan, micro_batch=min(per_process, CPU_MICRO_BATCH))
    elif config.micro_batch_size is None or config.gradient_checkpointing == "auto":
        # the largest micro-batch that fits, first without checkpointing where that is left to us
        tries = [False, True] if config.gradient_checkpointing == "auto" else [plan.gradient_checkpointing]
        sizes = [plan.micro_batch] if config.micro_batch_size else _halvings(per_process)
        fitting = (replace(plan, gradient_checkpointing=ckpt, micro_batch=size) for ckpt in tries for size in sizes)
        plan = next((p for p in fitting if memory.estimate(shape, p).total <= budget), plan)
    plan = replace(plan, micro_batch=min(plan.micro_batch, per_process))
    estimate = memory.estimate(shape, plan)
    if estimate.total > budget:
        where = f"{hardware.describe()} has {budget / GB:.1f} GB free" + (
            f" (--memory-limit-gb {config.memory_limit_gb})" if config.memory_limit_gb else "")
        better = memory.remedies(shape, plan, budget)
        hint = (f"{memory.flags(plan, better)} would need {memory.estimate(shape, better).total / GB:.1f} GB"
                if better else "no option here makes it fit: a smaller --max-len, or a bigger device")
        raise TrainError(f"this run needs about {estimate.describe()} but {where}; {hint}")
    accumulation = max(1, math.ceil(per_process / plan.micro_batch))
    return plan, accumulation, estimate


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


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
                raise TrainError(f"the checkpoint {last} is from a run with other data or options (dataset, seed, "
                                 "batch sizes, learning rate, adapter): run the same command to resume it, or "
                                 "add --no-resume to start over")
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
        plans = {}  # epoch -> steps (a pure function of the seed: batches.py)

        def steps_of(epoch: int):
            if epoch not in plans:
                plans[epoch] = epoch_plan([len(e.prompt_ids) + len(e.answer_ids) for e in examples], seed=config.seed,
                                          epoch=epoch, micro_batch=plan.micro_batch, accumulation=prepared.accumulation,
                                          world=world.size, group_by_length=config.group_by_length)
            return plans[epoch]

        total = sum(len(steps_of(e)) for e in range(config.epochs))
        if config.max_steps:
            total = min(total, config.max_steps)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16 if plan.precision == "bf16" else torch.float16,
                                  enabled=plan.precision != "fp32")
        stop = _StopSignal()
        started = time.monotonic()
        log = open(loss_log, "a") if world.main else None  # noqa: SIM115  (closed below, main process only)
        bar = tqdm(total=total, initial=progress.step, file=sys.stderr, unit="step",
                   desc=f"train {config.name}/{config.version}", disable=not (config.progress and world.main))
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
                            loss = model(input_ids=ids, attention_mask=mask, labels=labels,
                                         num_items_in_batch=items).loss
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
                        log.write(json.dumps({"step": progress.step, "epoch": progress.epoch, "loss": round(value, 6),
                                              "answer_tokens": progress.answer_tokens,
                                              "elapsed_s": round(elapsed, 3)}) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{progress.all_tokens / max(elapsed, 1e-9):.0f}")
                    bar.update(1)
                    out_of_time = bool(config.time_budget_s and elapsed >= config.time_budget_s)
                    stopping, out_of_time = group.any(stop.requested), group.any(out_of_time)
                    if stopping or (config.checkpoint_every and progress.step % config.checkpoint_every == 0):
                        saved = replace(progress, elapsed_s=elapsed, resumed_from=list(progress.resumed_from))
                        trainable = {n: p.detach().to("cpu", copy=True) for n, p in named}
                        where = checkpoint.save(work, saved, torch=torch, trainable=trainable, optimizer=optimizer,
                                                scaler=scaler, rank=world.rank, barrier=group.barrier)
                        if stopping:
                            raise TrainInterrupted(f"stopped by SIGTERM at step {progress.step}; checkpoint {where}: "
                                                   "run the same command to resume")
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
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if world.main:
            model.save_pretrained(work)
            adapter_config = work / CONFIG_FILE
            saved_config = json.loads(adapter_config.read_text())
            saved_config["base_model_name_or_path"] = prepared.base.path  # vLLM reads it for display only
            adapter_config.write_text(json.dumps(saved_config, indent=2))
        group.barrier()
    finally:
        group.close()
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    return TrainingRun(command=config.command, seed=config.seed, duration_s=round(duration, 3),
                       backend=f"torch-loop/{device.type}", epochs=min(progress.epoch + (progress.step_in_epoch > 0),
                                                                     config.epochs),
                       steps=progress.step, tokens=progress.answer_tokens,
                       tokens_per_s=round(progress.all_tokens / max(duration, 1e-9), 1),
                       loss_first=round(sum(head) / len(head), 5) if losses else None,
                       loss_last=round(sum(tail) / len(tail), 5) if losses else None,
                       loss_min=round(min(losses), 5) if losses else None, loss_log=LOSS_LOG_FILE,
                       precision=plan.precision, quantization=plan.quantization,
                       effective_batch=prepared.effective_batch, micro_batch=plan.micro_batch,
                       accumulation=prepared.accumulation, processes=world.size,
                       gradient_checkpointing=plan.gradient_checkpointing, max_len=plan.seq_len,
                       checkpoints_resumed=progress.resumed_from,
                       hardware=_hardware_text(prepared.hardware, world, device.type),
                       memory_estimate_gb=round(prepared.estimate.total / GB, 2), memory_peak_gb=round(peak / GB, 2))


def _fingerprint(prepared: Prepared) -> str:
    """What the sequence of steps depends on; the epochs, step limits and process count may change."""
    import hashlib

    c, p = prepared.config, prepared.plan
    what = [prepared.dataset.sha256, prepared.base.sha256, prepared.parent_ref, c.seed, c.held_out_share,
            prepared.effective_batch, p.micro_batch, c.group_by_length, c.lr, p.rank, list(p.targets), c.alpha,
            p.seq_len, p.precision, p.quantization]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _load_model(config: TrainConfig, plan: memory.Plan, device: Any, torch: Any) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.precision]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if plan.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if plan.precision != "fp32" else torch.bfloat16)
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
            model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                     target_modules=list(config.target_modules),
                                                     task_type="CAUSAL_LM"))
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


def work_directory(registry: Registry, name: str, version: str) -> Path:
    """Where a version is trained: the same for every attempt of the same command (resume)."""
    return registry.root / f".train-{name}-{version}"


def train(config: TrainConfig) -> tuple[Path, AdapterCard]:
    """Prepare, fit and register; returns the new version's directory and card (state: candidate).

    Every process of a multi-process run calls it; the first one writes and registers."""
    prepared = prepare(config)
    work = work_directory(prepared.registry, config.name, config.version)
    main = prepared.world.main
    with _training_lock(prepared.registry, config.name, config.version, main):
        if not config.resume and main:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(exist_ok=True)
        return _train_in(prepared, work)


@contextlib.contextmanager
def _training_lock(registry: Registry, name: str, version: str, main: bool) -> Iterator[None]:
    """One training of a version at a time (an orphaned run of a killed pipeline would share its checkpoints)."""
    if not main:
        yield
        return
    with open(registry.root / f".train-{name}-{version}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainError(f"another run is training {name}/{version} in {registry.location}") from None
        yield


def _train_in(prepared: Prepared, work: Path) -> tuple[Path, AdapterCard]:
    config, main = prepared.config, prepared.world.main
    try:
        held_sha = write_rows(prepared.held_rows, work / HELD_OUT_FILE) if main else ""
        run = fit(prepared, work, work / LOSS_LOG_FILE)
        if not main:
            return prepared.target, _wait_for_card(prepared.target)
        data = TrainingData(location=str(Path(config.dataset).resolve()) if "://" not in config.dataset
                            else config.dataset, sha256=prepared.dataset.sha256, rows=len(prepared.dataset.rows),
                            train_rows=len(prepared.train_rows), held_out_rows=len(prepared.held_rows),
                            held_out_location=str((prepared.target / HELD_OUT_FILE).resolve()),
                            held_out_sha256=held_sha, window_start=config.window_start,
                            window_end=config.window_end, trigger=config.trigger)
        card = new_card(config.name, config.version, work, prepared.base, parent=prepared.parent_ref, data=data,
                        training=run)
        target = prepared.registry.register(card, work, reason="trained", extra_files=(HELD_OUT_FILE, LOSS_LOG_FILE))
        shutil.rmtree(work, ignore_errors=True)  # registered: the checkpoints are no longer needed
        (prepared.registry.root / f".train-{config.name}-{config.version}.lock").unlink(missing_ok=True)
    except RegistryError as exc:
        raise TrainError(str(exc)) from None
    return target, read_card(target)


def _wait_for_card(target: Path, timeout_s: float = 600) -> AdapterCard:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return read_card(target)
        except RegistryError:
            if time.monotonic() > deadline:
                raise TrainError(f"the first process did not register {target}") from None
            time.sleep(0.5)
