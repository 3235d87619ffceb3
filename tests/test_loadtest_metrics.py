"""The metrics scraper on a real server: per-stage counts equal the requests sent, and the times add up."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from clients import samples
from clients.classify import PipelineClient
from loadtest import metrics

STAGES = ("preprocess", "classifier_onnx", "postprocess", "pipeline")


def settle(url, before, n, timeout=10.0):
    """Scrape until every stage shows the n requests (a stage's stats may land just after the reply)."""
    deadline = time.monotonic() + timeout
    while True:
        stages = {s.model: s for s in metrics.breakdown(before, metrics.scrape(url))}
        if all(m in stages and stages[m].requests >= n for m in STAGES) or time.monotonic() > deadline:
            return stages
        time.sleep(0.2)


def test_parse_reads_every_model_of_a_real_server(server):
    snap = metrics.scrape(server.metrics_url)
    assert set(STAGES) <= set(snap), sorted(snap)
    assert all(set(metrics.COUNTERS) <= set(row) for row in snap.values())


def test_breakdown_counts_equal_requests_sent_and_times_are_consistent(server, keys):
    n = 24
    before = metrics.scrape(server.metrics_url)
    images = [samples.photo("chelsea"), samples.photo("coffee")]

    def one(i):
        c = PipelineClient(server.grpc_url, key=keys.key("k1"), key_id="k1", client_id="metrics-test")
        try:
            return c.classify(images[i % 2], top_k=1)
        finally:
            c.close()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(n)))
    assert len(results) == n
    stages = settle(server.metrics_url, before, n)
    for model in STAGES:
        s = stages[model]
        assert (s.requests, s.failures, s.inferences) == (n, 0, n), s
        assert 1 <= s.executions <= n and abs(s.avg_batch - n / s.executions) < 0.01, s
        parts = s.queue_ms + s.input_ms + s.infer_ms + s.output_ms
        assert s.infer_ms > 0 and parts <= s.request_ms + 0.01, s
    table = metrics.markdown(list(stages.values()))
    assert all(f"| {m} | {n} | 0 |" in table for m in STAGES), table
