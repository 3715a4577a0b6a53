"""Admission: the bounded wait for a free replica slot, served by priority class (service/priority.py).

Only requests that find every replica at its in-flight limit (or others already waiting) come here. They
wait in one FIFO queue per class. A slot freed by a finished request is handed to the first waiter of one
class (``notify``): the hand-off takes the slot for the waiter (its ``take``) in the same step, so no
request arriving meanwhile can take it first, and nobody else is woken. Each step is O(1) (an ordered dict
per class); a waiter that cannot use the freed replica (it excluded it after a failure, its adapter cannot
go there) is passed over, at most ``LOOK_AHEAD`` of them per hand-off.

Which class: hand-offs follow a fixed cycle of turns, each class with a share (``LORAGATE_PRIORITY_SHARES``;
default critical 8, standard 2, sheddable 0; reduced to 4, 1, 0) having that many turns per cycle, spread
evenly (critical, critical, standard, critical, critical). The class whose turn it is gets the slot if one
of its waiters can use it, else the highest class that can: no slot stays free while a waiter can use it,
and a class waiting alone gets every slot. So while standard has waiters it gets at least 1 slot in every
5 handed off, however many critical requests wait, and critical at least 4; a class with share 0 only the
slots no class with a share can use (critical=1, the others 0: strict priority). The turn moves on with every
slot handed off, whoever got it, so a class cannot save up turns while it has no waiters.

Shedding, ``sheddable`` first:

- the queue is full: a newcomer above ``sheddable`` takes the place of the newest waiting sheddable
  request (that one is shed: ``displaced``); with none to displace, the newcomer is refused (``queue_full``);
- a request waits at most its class's limit: ``max_wait_s``, and less for ``sheddable``
  (``LORAGATE_SHEDDABLE_MAX_WAIT_S``; 0: never waits, shed as soon as every replica is full, as the
  Inference Extension's admission without flow control does) (``deadline``).

Every refusal is ``Overloaded`` (503 with Retry-After); the sheddable ones carry the code ``priority_shed``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from loragate.service.metrics import Metrics
from loragate.service.priority import DEFAULT_SHARES, PRIORITIES, Priority, check_shares
from loragate.service.resilience import Overloaded

T = TypeVar("T")
LOOK_AHEAD = 8  # waiters passed over (they cannot use the freed slot) per hand-off, at most
SHED_REASONS = ("queue_full", "displaced", "deadline")


class _Waiter(Generic[T]):
    __slots__ = ("take", "future")

    def __init__(self, take: Callable[[], T | None], future: asyncio.Future[T]) -> None:
        self.take = take  # takes a slot for this waiter now, or None when none it can use is free
        self.future = future


class Admission(Generic[T]):
    """At most ``max_waiting`` requests wait, each at most its class's wait (``max_wait_s`` by default)."""

    def __init__(
        self,
        max_waiting: int,
        max_wait_s: float,
        *,
        wait_s: Mapping[Priority, float] | None = None,
        shares: Mapping[Priority, int] = DEFAULT_SHARES,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.wait_s = {p: min(max_wait_s, (wait_s or {}).get(p, max_wait_s)) for p in PRIORITIES}
        self.retry_after_s = max(1, round(max_wait_s))
        self.waiting = 0  # requests in the queues now (a handed-off or shed one has left them)
        self._queues: tuple[OrderedDict[_Waiter[T], None], ...] = tuple(OrderedDict() for _ in PRIORITIES)
        self._clock = clock
        self.shares = check_shares(shares)
        self._turns = share_turns(self.shares)  # per turn: the classes in the order they are offered the slot
        self._turn = 0
        self._shed = self._waited = self._depth = self._by_share = None
        if metrics is not None:
            self._shed = {
                (p, reason): metrics.admission_shed.labels(p.label, reason)
                for p in PRIORITIES
                for reason in SHED_REASONS
            }
            self._waited = {p: metrics.admission_wait.labels(p.label) for p in PRIORITIES}
            self._depth = {p: metrics.admission_waiting.labels(p.label) for p in PRIORITIES}
            self._by_share = {p: metrics.admission_share_handoffs.labels(p.label) for p in PRIORITIES[1:]}

    def queued(self, priority: Priority) -> int:
        return len(self._queues[priority])

    def notify(self, look_ahead: int = LOOK_AHEAD) -> None:
        """Capacity may be free: hand it to the waiters, one slot per turn, while they can take it.

        Each turn offers the slot to its classes in order (its own class, then the others highest first).
        Waiters that cannot use what is free are passed over (``look_ahead`` of them at most) until one
        takes a slot; after that the first that cannot take one ends the round (nothing is left).
        """
        passes = look_ahead
        while self.waiting:
            order = self._turns[self._turn]
            for priority in order:
                queue = self._queues[priority]
                skip = 0
                while skip < len(queue):
                    waiter = next(iter(queue)) if skip == 0 else _nth(queue, skip)
                    if waiter.future.done():  # timed out or cancelled, not yet out of the queue: drop it now
                        self._leave(priority, queue, waiter)
                        continue
                    try:
                        ticket = waiter.take()
                    except Exception as exc:  # the waiter's request fails with it; the others go on
                        self._leave(priority, queue, waiter)
                        waiter.future.set_exception(exc)
                        continue
                    if ticket is None:
                        passes -= 1
                        if not passes:
                            return
                        skip += 1
                        continue
                    self._leave(priority, queue, waiter)
                    waiter.future.set_result(ticket)
                    self._turn = (self._turn + 1) % len(self._turns)
                    if self._by_share is not None and priority is order[0] and any(self._queues[:priority]):
                        self._by_share[priority].inc()  # its turn, while a higher class waited
                    passes = 1
                    break
                else:
                    continue  # nobody in this class took it: the next class
                break  # handed over: the next turn, for the next slot
            else:
                return  # no waiter took it

    async def wait(self, priority: Priority, take: Callable[[], T | None], give_back: Callable[[T], None]) -> T:
        """Wait for ``take`` to succeed, in class order; raises Overloaded when shed.

        ``take`` takes a slot and returns what the caller needs of it (None: nothing it can use is free);
        ``give_back`` returns a slot taken for a request that left at the same moment (cancelled).
        """
        wait_s = self.wait_s[priority]
        if wait_s <= 0:
            raise self._refuse(priority, "deadline", "every upstream replica is at capacity")
        if self.waiting >= self.max_waiting and not self._displace(priority):
            raise self._refuse(
                priority, "queue_full", "all upstream replicas are at capacity and the wait queue is full"
            )
        queue = self._queues[priority]
        waiter: _Waiter[T] = _Waiter(take, asyncio.get_running_loop().create_future())
        queue[waiter] = None
        self.waiting += 1
        if self._depth is not None:
            self._depth[priority].inc()
        started = self._clock()
        self.notify(look_ahead=1)  # room may have come back without a release (a replica healthy again)
        try:
            async with asyncio.timeout(wait_s):
                ticket = await waiter.future
        except TimeoutError:
            if not _holds_ticket(waiter.future):
                raise self._refuse(
                    priority, "deadline", "all upstream replicas stayed at capacity past the queue deadline"
                ) from None
            ticket = waiter.future.result()  # handed a slot as the deadline passed: serve it
        except BaseException:
            if _holds_ticket(waiter.future):  # handed a slot as the request went away: give it back
                give_back(waiter.future.result())
            raise
        finally:
            if waiter in queue:
                self._leave(priority, queue, waiter)
        if self._waited is not None:
            self._waited[priority].observe(self._clock() - started)
        return ticket

    # --- internals ------------------------------------------------------------

    def _leave(self, priority: Priority, queue: OrderedDict[_Waiter[T], None], waiter: _Waiter[T]) -> None:
        del queue[waiter]
        self.waiting -= 1
        if self._depth is not None:
            self._depth[priority].dec()

    def _displace(self, priority: Priority) -> bool:
        """The queue is full: shed the newest sheddable waiter to make room for a higher class (True)."""
        if priority >= Priority.SHEDDABLE:
            return False
        queue = self._queues[Priority.SHEDDABLE]
        while queue:
            victim = next(reversed(queue))
            self._leave(Priority.SHEDDABLE, queue, victim)
            if not victim.future.done():
                victim.future.set_exception(
                    self._refuse(
                        Priority.SHEDDABLE, "displaced", "shed from the wait queue for a higher-priority request"
                    )
                )
                return True
        return False

    def _refuse(self, priority: Priority, reason: str, message: str) -> Overloaded:
        if self._shed is not None:
            self._shed[priority, reason].inc()
        if priority is Priority.SHEDDABLE:
            return Overloaded(
                f"{message} (priority class sheddable is shed first)", self.retry_after_s, code="priority_shed"
            )
        return Overloaded(message, self.retry_after_s)


def share_turns(shares: Mapping[Priority, int]) -> tuple[tuple[Priority, ...], ...]:
    """The cycle of turns for ``shares`` (each class ``shares[p] / gcd`` turns, spread evenly by smooth weighted
    round robin, ties to the higher class); each turn is its class, then the others highest first."""
    divisor = math.gcd(*shares.values())
    weights = {p: shares[p] // divisor for p in PRIORITIES if shares.get(p)}
    total = sum(weights.values())
    credit = dict.fromkeys(weights, 0)
    turns = []
    for _ in range(total):
        for priority, weight in weights.items():
            credit[priority] += weight
        chosen = max(credit, key=lambda p: (credit[p], -p))
        credit[chosen] -= total
        turns.append((chosen, *(p for p in PRIORITIES if p is not chosen)))
    return tuple(turns)


def _nth(queue: OrderedDict, index: int):  # type: ignore[no-untyped-def]
    for position, item in enumerate(queue):
        if position == index:
            return item
    raise IndexError(index)


def _holds_ticket(future: asyncio.Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
