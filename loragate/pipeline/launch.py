"""Child processes for training: ``loragate train --processes N`` under torchrun, and SIGTERM passed on.

A Kubernetes Job's container gets SIGTERM on eviction in its first process only; a training run
in a child (the pipeline's ``loragate train``, torchrun's workers) must hear it too, to save a
checkpoint before the SIGKILL that follows the grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def torchrun_command(argv: Sequence[str], processes: int) -> list[str]:
    """``loragate ARGV`` as ``processes`` data-parallel workers on this node (torch.distributed.run)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "loragate",
        *argv,
    ]


def run_forwarding_sigterm(command: Sequence[str], **kwargs: Any) -> tuple[subprocess.CompletedProcess, bool]:
    """Run ``command`` to its end; a SIGTERM this process gets is passed to the child (which decides
    how to stop). Returns the finished process and whether a SIGTERM came."""
    terminated = False
    child = subprocess.Popen(command, **kwargs)

    def forward(signum: int, frame: Any) -> None:
        nonlocal terminated
        terminated = True
        if child.poll() is None:
            os.kill(child.pid, signal.SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread
        previous = None
    try:
        stdout, stderr = child.communicate()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return subprocess.CompletedProcess(list(command), child.returncode, stdout, stderr), terminated
