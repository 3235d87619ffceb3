"""The cascade's decisions: answer at the edge or escalate, and whether the cloud may be asked at all.

Pure logic, no Triton: ``model_repository/cascade/1/model.py`` asks these questions and
acts on the answers. Routes, as the audit records them:

- ``edge``: the edge model was confident enough (``Policy``) and answered;
- ``cloud``: it was not, and the big model answered (in the same server, or a remote one);
- ``edge_fallback``: it was not, but the cloud could not answer in time (down, slow, refused,
  breaker open): the edge answer is returned rather than an error.

The clock is injected everywhere, so the breaker and deadlines are tested without sleeping.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

EDGE, CLOUD, EDGE_FALLBACK = "edge", "cloud", "edge_fallback"
METRICS = ("top1", "margin")
Clock = Callable[[], float]


def confidence(probs: np.ndarray, metric: str = "top1") -> np.ndarray:
    """Per row of probabilities [N, C]: the top-1 probability, or the margin between the first two."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[np.newaxis]
    if metric == "top1":
        return p.max(axis=1)
    if metric == "margin":
        top2 = -np.partition(-p, 1, axis=1)[:, :2]
        return top2[:, 0] - top2[:, 1]
    raise ValueError(f"confidence metric {metric!r} is not one of {METRICS}")


@dataclass(frozen=True)
class Policy:
    """Answer at the edge when ``confidence >= threshold`` (so threshold 0 never escalates and a
    threshold above 1 always does). Non-finite confidence always escalates."""
    metric: str = "top1"
    threshold: float = 0.5

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"confidence metric {self.metric!r} is not one of {METRICS}")
        if not np.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")

    def decide(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(escalate: bool [N], confidence [N]) for edge probabilities [N, C]."""
        conf = confidence(probs, self.metric)
        escalate = ~(np.isfinite(conf) & (conf >= self.threshold))
        return escalate, conf


@dataclass
class Breaker:
    """Circuit breaker for the cloud leg.

    closed: calls go through; ``failures`` consecutive failures open it. open: no calls for
    ``reset_s`` (requests fall back at once instead of waiting for a deadline each). Then
    half-open: one trial call at a time; its success closes the breaker, its failure opens
    it for another ``reset_s``."""
    failures: int = 3
    reset_s: float = 5.0
    clock: Clock = time.monotonic
    state: str = "closed"
    _consecutive: int = 0
    _opened_at: float = 0.0
    _trial: bool = False
    # (time, new state) of the last 64 changes, for logs and tests: bounded, a flapping cloud runs for months
    transitions: deque = field(default_factory=lambda: deque(maxlen=64))

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.transitions.append((self.clock(), state))

    def allow(self) -> bool:
        """May a call to the cloud start now? In half-open, only one trial at a time."""
        if self.state == "open" and self.clock() - self._opened_at >= self.reset_s:
            self._set("half_open")
            self._trial = False
        if self.state == "closed":
            return True
        if self.state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self._consecutive = 0
        self._trial = False
        self._set("closed")

    def failure(self) -> None:
        self._consecutive += 1
        self._trial = False
        if self.state == "half_open" or self._consecutive >= self.failures:
            self._opened_at = self.clock()
            self._set("open")


@dataclass(frozen=True)
class Deadline:
    """A time budget for one escalation, retries included: each attempt gets what is left."""
    total_s: float
    started: float
    clock: Clock = time.monotonic

    @classmethod
    def start(cls, total_s: float, clock: Clock = time.monotonic) -> "Deadline":
        return cls(total_s, clock(), clock)

    def left(self) -> float:
        return max(0.0, self.total_s - (self.clock() - self.started))


def next_timeout(deadline: Deadline, attempt: int, attempts: int, min_attempt_s: float) -> float | None:
    """Timeout for attempt number ``attempt`` (0-based), or None when no attempt may start: all
    ``attempts`` used, or less than ``min_attempt_s`` left of the deadline (a retry that cannot
    finish in time only delays the fallback)."""
    if attempt >= attempts:
        return None
    left = deadline.left()
    return left if left >= min_attempt_s else None
