"""Closed-loop load at a fixed concurrency: N threads, each sending its next request when the last answered.

Closed loop, because the benchmark compares servers at equal concurrency. Threads,
not gevent: every arm (in-process ONNX Runtime, tritonclient gRPC/HTTP, plain
http.client) then runs under the same generator, and each client library releases
the GIL while it waits on its socket. Requests that start in the warm-up are not
counted; the window's throughput counts the requests that started and finished in it.
The caller measures this process's CPU around ``run()``: that is the load generator's cost.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

# make_call(worker_index) -> call(); call() sends one request and returns how many images it answered
MakeCall = Callable[[int], Callable[[], int]]


@dataclass
class Level:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    first_error: str = ""


def percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))]


def run(make_call: MakeCall, concurrency: int, *, workers: int | None = None, warmup: float = 1.5,
        seconds: float = 6.0, max_requests: int | None = None) -> Level:
    """``workers`` threads (default: ``concurrency``) loop for ``warmup + seconds`` or until ``max_requests``."""
    workers = workers or concurrency
    lock = threading.Lock()
    samples: list[float] = []
    errors: list[str] = []
    counted = [0]
    ready = threading.Barrier(workers + 1)
    go = threading.Event()
    t = {}

    def loop(index: int) -> None:
        call = make_call(index)
        ready.wait()
        go.wait()
        while True:
            start = time.perf_counter()
            if start >= t["end"] or (max_requests and counted[0] >= max_requests):
                return
            try:
                images, err = call(), ""
            except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash of the generator
                images, err = 0, f"{type(exc).__name__}: {exc}"[:300]
            done = time.perf_counter()
            if start >= t["begin"] and done <= t["end"]:
                with lock:
                    if err:
                        errors.append(err)
                    else:
                        samples.extend([(done - start) * 1000.0] * images)
                    counted[0] += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(workers)]
    for th in threads:
        th.start()
    ready.wait()  # clients are built before the clock starts
    now = time.perf_counter()
    t["begin"], t["end"] = now + warmup, now + warmup + seconds
    go.set()
    for th in threads:
        th.join()
    span = min(seconds, time.perf_counter() - t["begin"])
    samples.sort()
    return Level(concurrency, len(samples), len(errors), round(span, 3),
                 round(len(samples) / span, 2) if span > 0 else 0.0,
                 *(round(percentile(samples, q), 2) for q in (0.5, 0.9, 0.99)),
                 round(sum(samples) / len(samples), 2) if samples else float("nan"),
                 errors[0] if errors else "")
