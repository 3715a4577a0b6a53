from loragate.service.resilience import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, backoff_s


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
