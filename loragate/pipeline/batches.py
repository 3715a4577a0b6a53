"""Which rows go into which micro-batch of which step, for every process: a pure function of the seed.

An epoch is a seeded shuffle of the rows; with ``group_by_length`` the shuffled order is cut into
windows of ``GROUP_WINDOW`` optimizer steps' worth of rows, each sorted by length, so that a
micro-batch holds rows of similar length (little padding) while the epoch stays shuffled
(the windows, then the steps, are shuffled again). A step takes ``micro_batch * accumulation * world``
rows; process ``rank`` runs micro-batches ``rank, rank + world, ...`` of it. The plan depends on
(seed, epoch, sizes) only, so a resumed run at (epoch, step) sees the batches an uninterrupted one
would, and one process with N x the accumulation sees the same steps as N processes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

GROUP_WINDOW = 16  # steps per length-sorted window


@dataclass(frozen=True)
class Step:
    micro_batches: tuple[tuple[int, ...], ...]  # every process's, in order; row indices

    def for_rank(self, rank: int, world: int) -> tuple[tuple[int, ...], ...]:
        return self.micro_batches[rank::world]


def epoch_plan(
    lengths: list[int], *, seed: int, epoch: int, micro_batch: int, accumulation: int, world: int, group_by_length: bool
) -> list[Step]:
    """The epoch's optimizer steps; a last partial step is kept (every process gets at least nothing)."""
    order = list(range(len(lengths)))
    rng = random.Random(f"{seed}:{epoch}")
    rng.shuffle(order)
    per_step = micro_batch * accumulation * world
    if group_by_length:
        windows = [order[i : i + per_step * GROUP_WINDOW] for i in range(0, len(order), per_step * GROUP_WINDOW)]
        order = []
        for window in windows:
            window.sort(key=lambda i: lengths[i])
            micro = [window[i : i + micro_batch] for i in range(0, len(window), micro_batch)]
            head, last = (micro[:-1], micro[-1:]) if len(micro[-1]) < micro_batch else (micro, [])
            rng.shuffle(head)  # long and short micro-batches interleave; a short remainder stays last
            order.extend(i for m in head + last for i in m)
    steps = []
    for start in range(0, len(order), per_step):
        rows = order[start : start + per_step]
        steps.append(Step(tuple(tuple(rows[i : i + micro_batch]) for i in range(0, len(rows), micro_batch))))
    return steps
