"""The wait for a free replica slot by priority class (service/admission.py), on a counter of free slots.

Pure and fast: no pool, no HTTP. The same order end to end, through the app and a saturated stub
engine: tests/unit/test_priority.py.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from loragate.cli import serve_from_env
from loragate.service.admission import Admission, share_turns
from loragate.service.metrics import Metrics
from loragate.service.priority import DEFAULT_SHARES, Priority, shares_named
from loragate.service.resilience import Overloaded
from loragate.service.settings import Settings

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


# --- shares: a lower class is not starved by a higher one's overload (LORAGATE_PRIORITY_SHARES) ---------------

STRICT = {CRITICAL: 1}  # every other class 0: strict priority


async def overload_critical(
    slots: Slots, standard: list[asyncio.Task], max_handoffs: int, *, until: float = 0
) -> list[asyncio.Task]:
    """Frees one slot at a time while critical requests keep arriving, two per freed slot (critical alone would
    take every slot and still grow its queue), until ``standard`` are all done (and ``until`` s of loop time have
    passed) or ``max_handoffs`` slots were freed; returns the critical requests' tasks."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    critical = []
    for _ in range(max_handoffs):
        if all(t.done() for t in standard) and loop.time() - started >= until:
            break
        critical += [slots.wait(CRITICAL, "c"), slots.wait(CRITICAL, "c")]
        await settle()
        slots.release()
        await settle()
    return critical


async def cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_under_a_critical_overload_standard_gets_its_share_and_every_standard_request_is_served():
    metrics = Metrics(CollectorRegistry())
    admission: Admission[str] = Admission(max_waiting=100_000, max_wait_s=60, metrics=metrics)  # 8:2:0
    slots = Slots(admission)
    critical = [slots.wait(CRITICAL, "c") for _ in range(20)]
    standard = [slots.wait(STANDARD, f"t{i}") for i in range(100)]
    await settle()
    critical += await overload_critical(slots, standard, max_handoffs=1000)
    assert [t.result() for t in standard] == [f"t{i}" for i in range(100)]  # all served, in arrival order
    taken = slots.taken
    served_at = [i for i, name in enumerate(taken) if name != "c"]
    assert served_at == [2 + 5 * n for n in range(100)]  # the cycle c, c, t, c, c: the n-th within 5(n+1) slots
    assert abs(len(served_at) / len(taken) - 2 / 10) < 0.01  # its share: 2 of 8 + 2
    assert all(sum(name != "c" for name in taken[i : i + 5]) == 1 for i in range(len(taken) - 4))  # any 5 in a row
    assert admission.queued(CRITICAL) > 500  # while critical's own overload went on growing
    by_share = metrics.registry.get_sample_value("loragate_admission_share_handoffs_total", {"priority": "standard"})
    assert by_share == 100  # every standard slot went by its share (critical was waiting each time)
    await cancel(critical)
    assert admission.waiting == 0


async def test_strict_priority_would_starve_standard_until_its_deadline():
    """The same overload under strict priority (shares critical=1): standard gets no slot and ends by deadline
    (503), while with the default shares the same requests are all served well within it."""
    for shares, served in ((STRICT, 0), (DEFAULT_SHARES, 10)):
        admission: Admission[str] = Admission(max_waiting=100_000, max_wait_s=0.3, shares=shares)
        slots = Slots(admission)
        critical = [slots.wait(CRITICAL, "c") for _ in range(10)]
        standard = [slots.wait(STANDARD, f"t{i}") for i in range(10)]
        await settle()
        critical += await overload_critical(slots, standard, max_handoffs=100_000)
        results = await asyncio.gather(*standard, return_exceptions=True)
        assert sum(isinstance(r, str) for r in results) == served
        if not served:
            assert all(isinstance(r, Overloaded) and "deadline" in str(r) and r.code == "overloaded" for r in results)
            assert "t0" not in slots.taken and slots.taken.count("c") > 50  # the slots all went to critical
        await cancel(critical)


async def test_with_every_class_overloaded_each_gets_exactly_its_share():
    admission: Admission[str] = Admission(
        max_waiting=10_000, max_wait_s=60, shares={CRITICAL: 3, STANDARD: 2, SHEDDABLE: 1}
    )
    slots = Slots(admission)
    tasks = [slots.wait(p, p.label) for p in (CRITICAL, STANDARD, SHEDDABLE) for _ in range(700)]
    await settle()
    for _ in range(600):
        slots.release()
    assert [slots.taken.count(p.label) for p in (CRITICAL, STANDARD, SHEDDABLE)] == [300, 200, 100]
    assert all(len(set(slots.taken[i : i + 6])) == 3 for i in range(0, 600, 6))  # every cycle of 6 serves all
    await cancel(tasks)


async def test_a_class_waiting_alone_gets_every_slot():
    for priority in (CRITICAL, STANDARD, SHEDDABLE):
        admission: Admission[str] = Admission(max_waiting=100, max_wait_s=60)
        slots = Slots(admission)
        tasks = [slots.wait(priority, f"r{i}") for i in range(20)]
        await settle()
        for _ in range(20):
            slots.release()
            assert slots.free == 0  # nobody's turn is kept for a class with no waiters
        assert [await t for t in tasks] == [f"r{i}" for i in range(20)]


async def test_on_standards_turn_a_slot_it_cannot_use_goes_to_critical_and_its_next_turn_still_comes():
    admission: Admission[str] = Admission(max_waiting=100, max_wait_s=60)
    slots = Slots(admission)
    fits = {"now": False}
    critical = [slots.wait(CRITICAL, "c") for _ in range(20)]
    picky = slots.wait(STANDARD, "t", fits=lambda: fits["now"])  # it excluded the replica that frees up
    await settle()
    for _ in range(7):
        slots.release()
        assert slots.free == 0
    assert slots.taken == ["c"] * 7 and not picky.done()  # its turn (the 3rd) went to critical, not left free
    fits["now"] = True
    for _ in range(5):
        slots.release()
    assert slots.taken[7:] == ["t", "c", "c", "c", "c"]  # the turn after: the cycle is c, c, t, c, c
    assert await picky == "t"
    await cancel(critical)


async def test_sheddable_with_no_share_gets_no_slot_while_others_wait_and_is_still_shed_first():
    admission: Admission[str] = Admission(max_waiting=100_000, max_wait_s=60, wait_s={SHEDDABLE: 0.05})
    slots = Slots(admission)
    sheddable = [slots.wait(SHEDDABLE, "s") for _ in range(5)]
    standard = [slots.wait(STANDARD, f"t{i}") for i in range(10)]
    await settle()
    critical = await overload_critical(slots, standard, max_handoffs=10_000, until=0.1)
    assert "s" not in slots.taken and all(t.done() for t in standard)
    for task in sheddable:
        with pytest.raises(Overloaded, match="deadline") as shed:
            await task
        assert shed.value.code == "priority_shed"
    await cancel(critical)


def test_the_cycle_of_turns_gives_each_class_its_share_spread_out():
    assert [turn[0] for turn in share_turns({CRITICAL: 8, STANDARD: 2, SHEDDABLE: 0})] == [
        CRITICAL,
        CRITICAL,
        STANDARD,
        CRITICAL,
        CRITICAL,
    ]
    turns = share_turns({CRITICAL: 3, STANDARD: 2, SHEDDABLE: 1})
    assert [sum(t[0] is p for t in turns) for p in (CRITICAL, STANDARD, SHEDDABLE)] == [3, 2, 1]
    assert all(t[1:] == tuple(p for p in (CRITICAL, STANDARD, SHEDDABLE) if p is not t[0]) for t in turns)
    assert share_turns(STRICT) == ((CRITICAL, STANDARD, SHEDDABLE),)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("critical=8,standard=9", "standard (9) may not exceed the share of critical (8)"),
        ("critical=1,standard=0,sheddable=1", "sheddable (1) may not exceed"),
        ("critical=0", "critical must be at least 1 (critical=1,standard=0,sheddable=0 is strict priority)"),
        ("urgent=3", "unknown priority class 'urgent'"),
        ("critical=x", "critical must be a whole number, not 'x'"),
        ("critical=1,critical=2", "critical is given twice"),
        ("critical", "'critical' is not class=share"),
        ("critical=-1", "from 0 to 1000, not -1"),
        ("critical=1001", "from 0 to 1000, not 1001"),
    ],
)
def test_a_bad_priority_shares_setting_stops_the_gateway_with_what_is_wrong(monkeypatch, capsys, text, problem):
    monkeypatch.setenv("LORAGATE_PRIORITY_SHARES", text)
    with pytest.raises(ValidationError, match=re.escape(problem)):
        Settings()
    assert serve_from_env() == 2
    err = capsys.readouterr().err
    assert err.startswith("loragate: bad settings: LORAGATE_PRIORITY_SHARES: Value error, ") and problem in err


def test_priority_shares_are_read_as_written_a_class_left_out_has_none():
    assert Settings(priority_shares=" Critical = 4 , standard=1").priority_shares == "critical=4,standard=1,sheddable=0"
    assert Settings().priority_shares == "critical=8,standard=2,sheddable=0"
    assert shares_named("critical=4,standard=1") == {CRITICAL: 4, STANDARD: 1, SHEDDABLE: 0}
    with pytest.raises(ValueError, match="may not exceed"):
        Admission(max_waiting=1, max_wait_s=1, shares={CRITICAL: 1, STANDARD: 2})


def test_the_admission_metrics_pass_promtool_check_metrics():
    metrics = Metrics(CollectorRegistry())
    Admission(max_waiting=1, max_wait_s=1, metrics=metrics)  # every series of every class, at 0
    metrics.admission_share_handoffs.labels("standard").inc()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (apt-get install prometheus)"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=generate_latest(metrics.registry), capture_output=True, timeout=60
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
