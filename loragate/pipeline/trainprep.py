"""The preparation of a LoRA training run: its options (``TrainConfig``) and ``prepare``, every check that can be
made cheaply before torch is imported (registry writable, version free, usable rows, base model and parent agree,
the options fit the hardware, and the memory estimate fits the device: loragate/pipeline/memory.py), resolved into
the plan the loop runs (``Prepared``). loragate/pipeline/train.py runs it; loragate/pipeline/trainloop.py fits it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loragate.common.registry import (
    CARD_FILE,
    CONFIG_FILE,
    BaseModelRef,
    CardMismatch,
    Registry,
    RegistryError,
    base_model_ref,
    read_card,
    verify,
)
from loragate.pipeline import distributed, memory
from loragate.pipeline.chatdata import Dataset, DatasetError, Encoder, Example, read_dataset, split
from loragate.pipeline.hardware import GB, Hardware, probe


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
            raise TrainError(
                f"dataset {config.dataset}: no usable rows ({dataset.skipped} line(s) without a "
                "user prompt and a non-empty assistant answer)"
            )
        train_rows, held_rows = split(dataset.rows, config.held_out_share, config.seed)
        encoder = Encoder(config.base_model, _max_len(config))
    except DatasetError as exc:
        raise TrainError(str(exc)) from None
    examples = [e for e in map(encoder.encode, train_rows) if e is not None]
    if not examples:
        raise TrainError(f"dataset {config.dataset}: no training row fits in {config.max_len} tokens")
    seq_len = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    plan, accumulation, estimate = _fit_memory(config, shape, hardware, world, seq_len)
    return Prepared(
        config,
        registry,
        target,
        base,
        dataset,
        train_rows,
        held_rows,
        examples,
        parent_ref,
        hardware,
        world,
        plan,
        accumulation,
        estimate,
    )


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


def _fit_memory(
    config: TrainConfig, shape: memory.ModelShape, hardware: Hardware, world: distributed.World, seq_len: int
) -> tuple[memory.Plan, int, memory.Estimate]:
    """Resolve micro-batch and checkpointing ("auto") against the memory budget; refuse a run that cannot fit."""
    per_process = max(1, math.ceil(config.batch_size / world.size))
    rank, targets = _lora_shape(config)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if hardware.device == "cpu" else 1  # they share the RAM
    budget = config.memory_limit_gb * GB if config.memory_limit_gb else hardware.memory_free / max(1, local)
    plan = memory.Plan(
        device=hardware.device,
        precision=_precision(config, hardware),
        quantization=config.quantization,
        micro_batch=config.micro_batch_size or per_process,
        seq_len=seq_len,
        gradient_checkpointing=config.gradient_checkpointing == "on",
        rank=rank,
        targets=targets,
    )
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
            f" (--memory-limit-gb {config.memory_limit_gb})" if config.memory_limit_gb else ""
        )
        better = memory.remedies(shape, plan, budget)
        hint = (
            f"{memory.flags(plan, better)} would need {memory.estimate(shape, better).total / GB:.1f} GB"
            if better
            else "no option here makes it fit: a smaller --max-len, or a bigger device"
        )
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
            raise TrainError(
                f"parent adapter {card.ref} was trained on base model {card.base.name} "
                f"(sha256 {card.base.sha256[:16]}...), not on {base.path} (sha256 {base.sha256[:16]}...)"
            )
        return card.ref
    config = json.loads((directory / CONFIG_FILE).read_text())
    made_for = config.get("base_model_name_or_path")
    if not made_for or Path(made_for).resolve() != Path(base.path or "").resolve():
        raise TrainError(
            f"parent adapter {parent} has no card and names base model {made_for!r}, not "
            f"{base.path}: register it first (loragate adapters register) or pick the matching base"
        )
    return str(directory.resolve())
