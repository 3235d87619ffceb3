"""CPU throughput measured side by side: candidates take turns in short rounds.

The build machines are shared, so load from others drifts over seconds. Interleaving
rounds and taking each candidate's median round spreads that drift over all of them;
ratios between candidates are what to trust, not absolute img/s.
"""
import time

import numpy as np

from .paths import INPUT_NAME
from .runtime import as_input, session


def measure(models: dict, batches=(1, 8), rounds: int = 7, round_s: float = 0.25, warmup: int = 3) -> dict:
    """models: name -> path. Returns name -> {"b1": img/s, "b8": img/s, ...} (median over rounds)."""
    sessions = {k: session(p) for k, p in models.items()}
    rng = np.random.default_rng(0)
    result = {k: {} for k in models}
    for b in batches:
        x = ((rng.integers(0, 256, (b, 3, 224, 224)) - 127.0) / 128.0).astype(np.float32)
        feeds = {k: {INPUT_NAME: as_input(s, x)} for k, s in sessions.items()}
        for k, s in sessions.items():
            for _ in range(warmup):
                s.run(None, feeds[k])
        samples = {k: [] for k in models}
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for k in order:
                s, n, t0 = sessions[k], 0, time.perf_counter()
                while True:
                    s.run(None, feeds[k])
                    n += 1
                    dt = time.perf_counter() - t0
                    if dt >= round_s:
                        break
                samples[k].append(n * b / dt)
        for k in models:
            result[k][f"b{b}"] = float(np.median(samples[k]))
        print(f"  throughput batch {b}: " + ", ".join(f"{k} {result[k][f'b{b}']:.0f}" for k in models) + " img/s",
              flush=True)
    return result
