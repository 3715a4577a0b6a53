"""What the training run will run on, found without importing torch (4 s here): the memory estimate
needs it before anything heavy loads.

CUDA: ``nvidia-smi`` (name, total and free memory, compute capability); the CPU: /proc/meminfo's
MemAvailable, lowered by the cgroup's memory limit where one is set.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

GB = 1024**3


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" | "cpu"
    name: str  # "NVIDIA H100 80GB HBM3" | the CPU model
    count: int  # GPUs visible to this process (CPU: 1)
    memory_total: float  # bytes, one device
    memory_free: float  # bytes, one device, now
    bf16: bool  # the device computes in bfloat16 natively (CUDA: compute capability >= 8.0)

    def describe(self) -> str:
        return f"{self.count} x {self.name} ({self.memory_total / GB:.0f} GB)"


def probe() -> Hardware:
    """The first visible GPU where there is one (CUDA_VISIBLE_DEVICES="" hides them), else the CPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() not in ("", "-1"):
        gpu = _nvidia_smi()
        if gpu is not None:
            return gpu
    total, free = _cpu_memory()
    return Hardware("cpu", _cpu_name(), 1, total, free, bf16=False)


def _nvidia_smi() -> Hardware | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,memory.free,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.count(",") >= 4]
    if out.returncode != 0 or not rows:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        wanted = [v.strip() for v in visible.split(",")]
        rows = [r for r in rows if r[0] in wanted] or rows[: len(wanted)]
    _, name, total, free, capability = rows[0]
    try:
        major = float(capability)
    except ValueError:
        major = 0.0
    return Hardware("cuda", name, len(rows), float(total) * 1024**2, float(free) * 1024**2, bf16=major >= 8.0)


def _cpu_memory() -> tuple[float, float]:
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = float(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = info.get("MemTotal", 0.0)
    free = info.get("MemAvailable", total)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = float(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            total = min(total, float(limit)) if total else float(limit)
            free = min(free, float(limit) - used)
    except (OSError, ValueError):
        pass
    return total, free


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()
