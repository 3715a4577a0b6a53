import asyncio

import pytest

from loragate.service.resilience import CLOSED, HALF_OPEN, OPEN, Admission, CircuitBreaker, Overloaded, backoff_s


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_then_probes_and_closes():
    clock, changes = Clock(), []
    breaker = CircuitBreaker(failure_threshold=3, open_s=10, on_change=changes.append, clock=clock)
    for _ in range(2):
        breaker.failure()
    assert breaker.state == CLOSED and breaker.available()
    breaker.success()  # a success resets the count
    for _ in range(3):
        breaker.failure()
    assert breaker.state == OPEN and not breaker.available()
    clock.now += 10
    assert breaker.available()
    breaker.begin()
    assert breaker.state == HALF_OPEN
    assert not breaker.available()  # only one probe at a time
    breaker.success()
    assert breaker.state == CLOSED and breaker.available()
    assert changes == [OPEN, HALF_OPEN, CLOSED]


def test_failed_probe_reopens_for_a_full_period():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=5, clock=clock)
    breaker.failure()
    clock.now += 5
    breaker.begin()
    breaker.failure()
    assert breaker.state == OPEN
    clock.now += 4.9
    assert not breaker.available()
    clock.now += 0.1
    assert breaker.available()


def test_backoff_is_jittered_and_capped():
    values = [backoff_s(5, base_s=0.1, cap_s=0.3) for _ in range(200)]
    assert all(0 <= v <= 0.3 for v in values)
    assert len(set(values)) > 150


async def test_admission_waits_for_capacity_then_admits():
    admission = Admission(max_waiting=2, max_wait_s=1)
    free = {"slots": 0}

    async def release_later():
        await asyncio.sleep(0.05)
        free["slots"] = 1
        admission.notify()

    asyncio.get_running_loop().create_task(release_later())
    await admission.wait_until(lambda: free["slots"] > 0)
    assert admission.waiting == 0


async def test_admission_rejects_when_queue_full_or_deadline_passes():
    admission = Admission(max_waiting=1, max_wait_s=0.1)
    waiter = asyncio.ensure_future(admission.wait_until(lambda: False))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="queue is full"):
        await admission.wait_until(lambda: False)
    with pytest.raises(Overloaded, match="deadline") as info:
        await waiter
    assert info.value.retry_after_s >= 1
    assert admission.waiting == 0
