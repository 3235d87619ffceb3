"""CPU accounting around a measurement: the load generator, each server, and everyone else.

On a 2-core host the client competes with the server for the same cores, and other
people's jobs compete with both. Reporting cores used by each (CPU seconds / wall
seconds) says whether a latency number is the server's or the machine's.
"""
from __future__ import annotations

import os
import time

import psutil


def _tree_seconds(pid: int, children: bool = True) -> float:
    """User+system CPU seconds of a process and its live children (Triton's model stubs)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *(root.children(recursive=True) if children else [])]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


def _busy_seconds() -> float:
    c = psutil.cpu_times()
    return c.user + c.nice + c.system + c.irq + c.softirq + getattr(c, "steal", 0.0)


class CpuMeter:
    """``with CpuMeter({"server": pid}) as m: ...`` then ``m.cores`` = {client, server..., other, machine}."""

    def __init__(self, servers: dict[str, int | None]):
        self.servers = {k: v for k, v in servers.items() if v}
        self.cores: dict[str, float] = {}

    def _snap(self) -> dict[str, float]:
        snap = {"client": _tree_seconds(os.getpid(), children=False), "machine": _busy_seconds(),
                "wall": time.perf_counter()}
        snap.update({name: _tree_seconds(pid) for name, pid in self.servers.items()})
        return snap

    def __enter__(self) -> "CpuMeter":
        self._before = self._snap()
        return self

    def __exit__(self, *exc) -> None:
        after = self._snap()
        wall = after.pop("wall") - self._before["wall"]
        used = {k: (after[k] - self._before[k]) / wall for k in after}
        used["other"] = max(0.0, used["machine"] - sum(v for k, v in used.items() if k != "machine"))
        self.cores = {k: round(v, 2) for k, v in used.items()}
        self.cores["host_cores"] = psutil.cpu_count()
