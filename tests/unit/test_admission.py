"""The wait for a free replica slot by priority class (service/admission.py), on a counter of free slots.

Pure and fast: no pool, no HTTP. The same order end to end, through the app and a saturated stub
engine: tests/unit/test_priority.py.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from loragate.service.admission import Admission
from loragate.service.metrics import Metrics
from loragate.service.priority import Priority
from loragate.service.resilience import Overloaded

CRITICAL, STANDARD, SHEDDABLE = Priority.CRITICAL, Priority.STANDARD, Priority.SHEDDABLE


class Slots:
    """Free slots and who took them, in order; ``takes`` counts every try (the cost of a hand-off)."""

    def __init__(self, admission: Admission, free: int = 0) -> None:
        self.admission = admission
        self.free = free
        self.taken: list[str] = []
        self.takes = 0

    def take_for(self, name: str, fits=lambda: True):
        def take():
            self.takes += 1
            if self.free > 0 and fits():
                self.free -= 1
                self.taken.append(name)
                return name
            return None

        return take

    def give_back(self, _name: str) -> None:
        self.release()

    def release(self) -> None:
        self.free += 1
        self.admission.notify()

    def wait(self, priority: Priority, name: str, fits=lambda: True) -> asyncio.Task:
        return asyncio.ensure_future(self.admission.wait(priority, self.take_for(name, fits), self.give_back))


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_waiters_get_freed_slots_highest_class_first_and_in_arrival_order_within_a_class():
    admission: Admission[str] = Admission(max_waiting=10, max_wait_s=5)
    slots = Slots(admission)
    arrivals = [
        (SHEDDABLE, "s1"),
        (STANDARD, "t1"),
        (CRITICAL, "c1"),
        (STANDARD, "t2"),
        (SHEDDABLE, "s2"),
        (CRITICAL, "c2"),
    ]
    tasks = [slots.wait(priority, name) for priority, name in arrivals]
    await settle()
    assert admission.waiting == 6 and slots.taken == []
    for _ in arrivals:
        slots.release()
        await settle()
    assert slots.taken == ["c1", "c2", "t1", "t2", "s1", "s2"]
    assert [t.result() for t in tasks] == ["s1", "t1", "c1", "t2", "s2", "c2"]
    assert admission.waiting == 0 and slots.free == 0


async def test_a_freed_slot_is_taken_in_the_hand_off_so_a_newcomer_cannot_jump_the_queue():
    admission: Admission[str] = Admission(max_waiting=10, max_wait_s=5)
    slots = Slots(admission)
    waiting = slots.wait(SHEDDABLE, "queued")
    await settle()
    slots.release()  # the waiter has the slot before it even runs again
    assert slots.free == 0 and slots.taken == ["queued"] and admission.waiting == 0
    assert await waiting == "queued"


async def test_one_hand_off_tries_at_most_two_waiters_however_long_the_queue():
    admission: Admission[str] = Admission(max_waiting=5000, max_wait_s=5)
    slots = Slots(admission)
    tasks = [slots.wait((STANDARD, SHEDDABLE)[i % 2], f"r{i}") for i in range(2000)]
    await settle()
    slots.takes = 0
    for _ in range(100):
        slots.release()
    assert slots.takes <= 200  # the one that takes the slot, and the next one that finds nothing left
    assert slots.taken == [f"r{i}" for i in range(0, 200, 2)]  # standard first, oldest first
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert admission.waiting == 0


async def test_a_waiter_that_cannot_use_the_freed_slot_is_passed_over_and_keeps_its_place():
    admission: Admission[str] = Admission(max_waiting=10, max_wait_s=5)
    slots = Slots(admission)
    other_replica = {"free": False}
    picky = slots.wait(CRITICAL, "picky", fits=lambda: other_replica["free"])  # it excluded this replica
    plain = slots.wait(STANDARD, "plain")
    await settle()
    slots.release()
    await settle()
    assert slots.taken == ["plain"] and not picky.done() and await plain == "plain"
    other_replica["free"] = True
    slots.release()
    assert await picky == "picky"


async def test_a_full_queue_sheds_its_newest_sheddable_waiter_for_a_higher_class():
    metrics = Metrics(CollectorRegistry())
    admission: Admission[str] = Admission(max_waiting=3, max_wait_s=5, metrics=metrics)
    slots = Slots(admission)
    old, new, standard = slots.wait(SHEDDABLE, "old"), slots.wait(SHEDDABLE, "new"), slots.wait(STANDARD, "t")
    await settle()
    critical = slots.wait(CRITICAL, "c")
    await settle()
    with pytest.raises(Overloaded, match="higher-priority") as shed:
        await new
    assert shed.value.code == "priority_shed" and shed.value.retry_after_s == 5
    assert admission.waiting == 3 and not old.done()
    late = slots.wait(SHEDDABLE, "late")  # full, and a sheddable newcomer displaces nobody
    with pytest.raises(Overloaded, match="queue is full") as refused:
        await late
    assert refused.value.code == "priority_shed"
    third = slots.wait(STANDARD, "t2")  # displaces the last sheddable one
    await settle()
    with pytest.raises(Overloaded):
        await old
    fourth = slots.wait(STANDARD, "t3")  # nothing sheddable left: refused, as overloaded
    with pytest.raises(Overloaded, match="queue is full") as full:
        await fourth
    assert full.value.code == "overloaded"
    for _ in range(3):
        slots.release()
    assert [await t for t in (critical, standard, third)] == ["c", "t", "t2"]
    shed_count = {
        (p, r): metrics.registry.get_sample_value("loragate_admission_shed_total", {"priority": p, "reason": r})
        for p, r in [
            ("sheddable", "displaced"),
            ("sheddable", "queue_full"),
            ("standard", "queue_full"),
            ("critical", "queue_full"),
        ]
    }
    assert shed_count == {
        ("sheddable", "displaced"): 2,
        ("sheddable", "queue_full"): 1,
        ("standard", "queue_full"): 1,
        ("critical", "queue_full"): 0,
    }
    waited = metrics.registry.get_sample_value("loragate_admission_wait_seconds_count", {"priority": "standard"})
    assert waited == 2
    assert metrics.registry.get_sample_value("loragate_admission_waiting_requests", {"priority": "sheddable"}) == 0


async def test_sheddable_requests_reach_their_shorter_deadline_first():
    admission: Admission[str] = Admission(max_waiting=10, max_wait_s=0.5, wait_s={SHEDDABLE: 0.05})
    slots = Slots(admission)
    sheddable, standard = slots.wait(SHEDDABLE, "s"), slots.wait(STANDARD, "t")
    with pytest.raises(Overloaded, match="deadline") as shed:
        await sheddable
    assert shed.value.code == "priority_shed"
    assert not standard.done()  # still waiting; then its own deadline
    with pytest.raises(Overloaded, match="deadline") as late:
        await standard
    assert late.value.code == "overloaded" and admission.waiting == 0
    never = Admission(max_waiting=10, max_wait_s=0.5, wait_s={SHEDDABLE: 0})
    with pytest.raises(Overloaded, match="at capacity"):  # 0: refused as soon as every replica is full
        await never.wait(SHEDDABLE, lambda: None, lambda _t: None)


async def test_a_slot_handed_to_a_request_that_went_away_goes_to_the_next_waiter():
    admission: Admission[str] = Admission(max_waiting=10, max_wait_s=5)
    slots = Slots(admission)
    gone, next_one = slots.wait(CRITICAL, "gone"), slots.wait(STANDARD, "next")
    await settle()
    slots.release()  # handed to "gone" ...
    gone.cancel()  # ... which is cancelled (its client left) before it runs again
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await next_one == "next"  # the slot came back and went on
    assert slots.free == 0 and admission.waiting == 0


async def test_the_fast_path_is_untouched_when_nobody_waits():
    admission: Admission[str] = Admission(max_waiting=10, max_wait_s=5)
    admission.notify()  # nothing to do, nothing tried
    assert admission.waiting == 0
    slots = Slots(admission, free=1)
    assert await slots.wait(STANDARD, "direct") == "direct"  # room at once: taken as it queues, no waiting
