"""Step load: users rise by a fixed step at fixed intervals, to find the knee.

Load it next to the locustfile (``-f loadtest/locustfile.py,loadtest/stepload.py``).
Each step's requests (minus a settling time after the user count changes) are kept,
and at the end ``<--csv prefix>_steps.json`` lists per step: users, throughput,
p50/p95/p99, errors. The knee is the step with the highest throughput whose p99 is
within the SLO (``python -m loadtest.run --step`` reports it).
"""
from __future__ import annotations

import json
import math
import time

from locust import LoadTestShape, events


@events.init_command_line_parser.add_listener
def _options(parser):
    group = parser.add_argument_group("step load")
    group.add_argument("--step-users", type=int, default=2, env_var="LOCUST_STEP_USERS", help="users added per step")
    group.add_argument("--step-time", type=float, default=12.0, env_var="LOCUST_STEP_TIME", help="seconds per step")
    group.add_argument("--step-max-users", type=int, default=16, env_var="LOCUST_STEP_MAX_USERS")
    group.add_argument("--step-settle", type=float, default=3.0, env_var="LOCUST_STEP_SETTLE",
                       help="seconds after each step's start whose requests are not counted")


class StepLoadShape(LoadTestShape):
    def tick(self):
        opts = self.runner.environment.parsed_options
        step = int(self.get_run_time() // opts.step_time)
        users = (step + 1) * opts.step_users
        if users > opts.step_max_users:
            return None
        return users, users


class _Steps:
    """Per-step response times, keyed by the step's user count."""

    def __init__(self):
        self.samples: dict[int, list[float]] = {}
        self.errors: dict[int, int] = {}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.changed_at = time.monotonic()
        self.users = -1

    def record(self, env, response_time: float, exception) -> None:
        opts = env.parsed_options
        users = env.runner.user_count if env.runner else 0
        now = time.monotonic()
        if users != self.users:
            self.users, self.changed_at = users, now
        if now - self.changed_at < opts.step_settle:
            return
        self.first.setdefault(users, now)
        self.last[users] = now
        self.samples.setdefault(users, []).append(response_time)
        self.errors[users] = self.errors.get(users, 0) + (exception is not None)

    def summary(self) -> list[dict]:
        out = []
        for users in sorted(self.samples):
            times = sorted(self.samples[users])
            span = self.last[users] - self.first[users]
            pct = lambda q: times[min(len(times) - 1, max(0, math.ceil(q * len(times)) - 1))]
            out.append({"users": users, "requests": len(times), "errors": self.errors[users],
                        "seconds": round(span, 2), "throughput": round(len(times) / span, 2) if span > 0 else 0.0,
                        "p50_ms": round(pct(0.50), 2), "p95_ms": round(pct(0.95), 2), "p99_ms": round(pct(0.99), 2)})
        return out


_steps = _Steps()
_env = None


@events.init.add_listener
def _init(environment, **_kw):
    global _env
    _env = environment


@events.request.add_listener
def _on_request(response_time, exception=None, **_kw):
    if _env is not None:
        _steps.record(_env, response_time, exception)


@events.quitting.add_listener
def _write(environment, **_kw):
    prefix = environment.parsed_options.csv_prefix
    if prefix:
        with open(f"{prefix}_steps.json", "w") as fh:
            json.dump(_steps.summary(), fh, indent=1)
