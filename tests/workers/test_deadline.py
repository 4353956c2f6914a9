"""Deadline: trial and per-evaluation limits, on a controlled clock."""

from __future__ import annotations

from workers.deadline import Deadline


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_limits_is_inactive_and_never_exceeded() -> None:
    clock = Clock()
    deadline = Deadline(None, None, clock)
    assert not deadline.active
    with deadline.evaluation("perplexity"):
        clock.now += 1e9
        assert deadline.exceeded() is None


def test_trial_limit_counts_from_the_start() -> None:
    clock = Clock()
    deadline = Deadline(10, None, clock)
    clock.now += 10
    assert deadline.exceeded() is None
    clock.now += 0.5
    assert "trial_timeout_s = 10 s" in deadline.exceeded()


def test_evaluation_limit_counts_per_evaluation_only() -> None:
    clock = Clock()
    deadline = Deadline(None, 5, clock)
    clock.now += 100  # model loading and the method are not evaluations
    assert deadline.exceeded() is None
    with deadline.evaluation("perplexity"):
        clock.now += 4
        assert deadline.exceeded() is None
    with deadline.evaluation("speed"):
        clock.now += 6
        assert "evaluation speed ran for more than evaluation.timeout_s = 5 s" in \
            deadline.exceeded()
    assert deadline.exceeded() is None
