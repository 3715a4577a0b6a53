"""Training checkpoints inside the run's work directory: ``checkpoints/step-NNNNNNN/``.

One holds what a resumed run needs to end where an uninterrupted one would: the adapter's
trainable tensors, AdamW's state, the loss scaler's, the position (epoch, step within it, steps
done), the run's counters, and every process's RNG states (Python, torch CPU, CUDA). Each file is
written atomically into ``step-N.partial/``, which the first process renames to ``step-N`` once all
are there (after a barrier): a checkpoint directory without the suffix is complete. The last
``KEEP`` are kept.
"""

from __future__ import annotations

import io
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loragate.common.atomicio import atomic_write, fsync_dir

DIRECTORY = "checkpoints"
KEEP = 2
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Progress:
    """Where the run stands after ``step`` optimizer steps."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # steps of ``epoch`` done
    answer_tokens: int = 0
    all_tokens: int = 0
    elapsed_s: float = 0.0  # training time before this process started
    resumed_from: list[int] = field(default_factory=list)  # steps of the checkpoints this run continued from
    fingerprint: str = ""  # what the steps depend on (data, seed, batch sizes, ...): a resume must match it


def latest(work: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in (work / DIRECTORY).glob("step-*") if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def save(
    work: Path,
    progress: Progress,
    *,
    torch: Any,
    trainable: dict[str, Any],
    optimizer: Any,
    scaler: Any,
    rank: int,
    barrier: Callable[[], None],
) -> Path:
    """Every process calls it at the same step; returns the complete checkpoint's directory."""
    root = work / DIRECTORY
    final = root / f"step-{progress.step:07d}"
    partial = root / f"step-{progress.step:07d}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    _write(torch, partial / f"rng-{rank}.pt", _rng_state(torch))
    barrier()
    if rank == 0:
        _write(
            torch,
            partial / "state.pt",
            {
                "progress": asdict(progress),
                "trainable": trainable,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            },
        )
        if final.exists():  # the same step saved before a crash: replace it
            shutil.rmtree(final)
        partial.rename(final)
        fsync_dir(root)
        for old in sorted(p for p in root.glob("step-*") if _NAME.match(p.name))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(directory: Path, *, torch: Any, rank: int) -> tuple[Progress, dict[str, Any]]:
    """The checkpoint's progress and state (``trainable``, ``optimizer``, ``scaler``); restores this
    process's RNG states (a process the checkpoint did not know keeps its own)."""
    state = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
    rng = directory / f"rng-{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch, torch.load(rng, map_location="cpu", weights_only=False))
    return Progress(**state["progress"]), state


def _write(torch: Any, path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer())


def _rng_state(torch: Any) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(torch: Any, state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
