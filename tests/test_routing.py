"""rtinfer.routing: the cascade's threshold decision, circuit breaker and deadlines (injected clock)."""
import numpy as np
import pytest

from rtinfer import routing


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_confidence_top1_and_margin():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert np.allclose(routing.confidence(p, "top1"), [0.7, 0.4])
    assert np.allclose(routing.confidence(p, "margin"), [0.5, 0.05])
    with pytest.raises(ValueError):
        routing.confidence(p, "entropy")


def test_policy_escalates_below_threshold_and_on_nan():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [np.nan, 0.5, 0.5]])
    esc, conf = routing.Policy("top1", 0.5).decide(p)
    assert esc.tolist() == [False, True, True]
    assert conf[0] == pytest.approx(0.7)
    assert not routing.Policy("top1", 0.0).decide(p[:2])[0].any()
    assert routing.Policy("top1", 1.01).decide(p[:2])[0].all()
    assert routing.Policy("margin", 0.1).decide(p)[0].tolist() == [False, True, True]
    for bad in (float("nan"), -0.1):
        with pytest.raises(ValueError):
            routing.Policy("top1", bad)


def test_breaker_opens_after_consecutive_failures_and_recovers_through_one_trial():
    clock = Clock()
    b = routing.Breaker(failures=3, reset_s=5.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.success()  # a success resets the count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow()
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.2
    assert b.allow() and b.state == "half_open"
    assert not b.allow()  # one trial at a time
    b.failure()           # the trial failed: open again for reset_s
    assert b.state == "open" and not b.allow()
    clock.t += 5.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()
    assert [s for _, s in b.transitions] == ["open", "half_open", "open", "half_open", "closed"]


def test_deadline_bounds_retries():
    clock = Clock()
    d = routing.Deadline.start(1.0, clock)
    assert routing.next_timeout(d, 0, 3, 0.2) == pytest.approx(1.0)
    clock.t += 0.7
    assert routing.next_timeout(d, 1, 3, 0.2) == pytest.approx(0.3)
    assert routing.next_timeout(d, 3, 3, 0.2) is None  # attempts used up
    clock.t += 0.15
    assert routing.next_timeout(d, 2, 3, 0.2) is None  # not enough time left for another try
    assert d.left() == pytest.approx(0.15)
