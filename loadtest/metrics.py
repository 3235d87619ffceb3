"""Per-stage latency breakdown from Triton's Prometheus metrics, scraped before and after a run.

Triton's counters are cumulative since start, so the difference of two scrapes is
exactly the run's work, per model: request count, time in the queue, compute
input/infer/output time, and executions vs inferences (their ratio is the average
dynamic batch size). Durations are summed per request, so averages divide by the
request count. The ensemble's own row is end to end inside the server.

    python -m loadtest.metrics http://127.0.0.1:8002/metrics   # print the counters now
"""
from __future__ import annotations

import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

COUNTERS = {
    "success": "nv_inference_request_success",
    "inferences": "nv_inference_count",
    "executions": "nv_inference_exec_count",
    "request_us": "nv_inference_request_duration_us",
    "queue_us": "nv_inference_queue_duration_us",
    "input_us": "nv_inference_compute_input_duration_us",
    "infer_us": "nv_inference_compute_infer_duration_us",
    "output_us": "nv_inference_compute_output_duration_us",
}
FAILURE = "nv_inference_request_failure"

Snapshot = dict  # model -> {counter key: value}


def parse(text: str) -> Snapshot:
    """Prometheus text -> {model: {success, inferences, executions, *_us, failure}} (versions summed)."""
    names = {v: k for k, v in COUNTERS.items()}
    out: Snapshot = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or line.startswith("#"):
            continue
        name = m["name"]
        key = names.get(name) or ("failure" if name == FAILURE else None)
        if key is None:
            continue
        labels = dict(_LABEL.findall(m["labels"] or ""))
        model = labels.get("model")
        if model is None:
            continue
        row = out.setdefault(model, dict.fromkeys([*COUNTERS, "failure"], 0.0))
        row[key] += float(m["value"])
    return out


def scrape(url: str, timeout: float = 5.0, wait: float = 15.0) -> Snapshot:
    """Retries for ``wait`` seconds: Triton reports ready a moment before its metrics port listens."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return parse(resp.read().decode())
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class Stage:
    model: str
    requests: int
    failures: int
    executions: int
    inferences: int
    avg_batch: float
    request_ms: float  # average time in this model per request (queue + compute + overhead)
    queue_ms: float
    input_ms: float
    infer_ms: float
    output_ms: float

    def row(self) -> dict:
        return asdict(self)


def breakdown(before: Snapshot, after: Snapshot, order=("preprocess", "classifier_onnx", "postprocess")) -> list[Stage]:
    """One Stage per model that served requests between the scrapes: composing models in
    ``order`` first (others after), then the ensembles (models without their own executions batching)."""
    stages = []
    for model, now in after.items():
        was = before.get(model, {})
        d = {k: now[k] - was.get(k, 0.0) for k in now}
        n = int(d["success"])
        if n <= 0 and d["failure"] <= 0:
            continue
        per = max(n, 1)
        stages.append(Stage(model, n, int(d["failure"]), int(d["executions"]), int(d["inferences"]),
                            round(d["inferences"] / d["executions"], 3) if d["executions"] else 0.0,
                            *(round(d[k] / per / 1000.0, 3) for k in ("request_us", "queue_us", "input_us",
                                                                       "infer_us", "output_us"))))
    rank = {m: i for i, m in enumerate(order)}
    stages.sort(key=lambda s: (rank.get(s.model, len(rank)), s.model))
    return stages


def markdown(stages: list[Stage]) -> str:
    head = ("| model | requests | failures | executions | avg batch | in model ms | queue ms | "
            "compute input ms | compute infer ms | compute output ms |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [f"| {s.model} | {s.requests} | {s.failures} | {s.executions} | {s.avg_batch:.2f} | {s.request_ms:.2f} | "
            f"{s.queue_ms:.2f} | {s.input_ms:.2f} | {s.infer_ms:.2f} | {s.output_ms:.2f} |" for s in stages]
    return "\n".join([head, *rows])


if __name__ == "__main__":
    snap = scrape(sys.argv[1])
    print(markdown(breakdown({}, snap)))
