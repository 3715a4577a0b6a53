"""Data parallel over processes started by ``torchrun`` or ``accelerate launch`` (both set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on GPUs, gloo on CPUs.

Every process runs the same loop on its share of each step's micro-batches (loragate/pipeline/batches.py);
after the step's backward passes the adapter's gradients (a few MB: LoRA only) are summed over the
processes in one flat all-reduce, so every process takes the same optimizer step. No DDP wrapper:
nothing to configure, and gradient checkpointing needs no special mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> World:
    try:
        return World(
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError:
        return World()


class Group:
    """The process group's few operations the loop needs; with one process, all of them are no-ops."""

    def __init__(self, world: World, torch: Any, device: Any) -> None:
        self.world, self.torch, self.device = world, torch, device
        self.dist = torch.distributed if world.size > 1 else None
        if self.dist is not None and not self.dist.is_initialized():
            self.dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def sum_gradients(self, params: list[Any]) -> None:
        if self.dist is None:
            return
        grads = [p.grad if p.grad is not None else self.torch.zeros_like(p) for p in params]
        flat = self.torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def sum(self, values: list[float]) -> list[float]:
        if self.dist is None:
            return values
        t = self.torch.tensor(values, dtype=self.torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def any(self, flag: bool) -> bool:
        return bool(self.sum([1.0 if flag else 0.0])[0]) if self.dist is not None else flag

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()
