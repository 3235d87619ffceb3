"""The one-request breakdown reads Triton's trace file as Triton 2.51 writes it (one JSON array of
model records and one-stamp timestamp records, steps linked to the ensemble by parent_id) and
cuts the request's critical path into segments that add up to what the client measured."""
from __future__ import annotations

import json
import time

from clients import samples
from clients.classify import PipelineClient
from loadtest import breakdown
from rtinfer.launch.server import TritonServer

from conftest import require_model


def _trace(rid: str, base: int, tid: int, late_output: dict | None = None) -> list[dict]:
    """A traced ensemble request as Triton writes it, stamps in ns from ``base`` (shape copied from a real
    server's trace file). ``late_output``: step -> its COMPUTE_OUTPUT_START/END/REQUEST_END offset, for a
    step that sent its answer before ``execute()`` returned."""
    ens = {"GRPC_WAITREAD_START": 0, "GRPC_WAITREAD_END": 1_000_000, "REQUEST_START": 1_100_000,
           "QUEUE_START": 1_120_000, "INFER_RESPONSE_COMPLETE": 12_000_000, "GRPC_SEND_START": 12_100_000,
           "GRPC_SEND_END": 12_300_000, "REQUEST_END": 12_400_000}
    steps = {"preprocess": 1_200_000, "classifier_onnx": 5_000_000, "postprocess": 8_500_000}
    items = [{"id": tid, "model_name": "pipeline", "model_version": 1, "request_id": rid}]
    items += [{"id": tid, "timestamps": [{"name": k, "ns": base + v}]} for k, v in ens.items()]
    for i, (step, t) in enumerate(steps.items()):
        sid = tid + 1 + i
        items.append({"id": sid, "model_name": step, "model_version": 1, "request_id": rid, "parent_id": tid})
        late = (late_output or {}).get(step, 0)
        for k, dt in (("REQUEST_START", 0), ("QUEUE_START", 10_000), ("COMPUTE_START", 200_000),
                      ("COMPUTE_INPUT_END", 300_000), ("COMPUTE_OUTPUT_START", late or 3_000_000),
                      ("COMPUTE_END", late + 500_000 if late else 3_500_000),
                      ("REQUEST_END", late + 600_000 if late else 3_600_000)):
            items.append({"id": sid, "timestamps": [{"name": k, "ns": base + t + dt}]})
    return items


def test_segments_follow_the_critical_path_and_add_up(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_trace("a", 10**12, 1) + _trace("b", 2 * 10**12, 5)))
    traces = breakdown.read_traces(path)
    assert set(traces) == {"a", "b"}
    assert set(traces["a"]) >= {"ensemble", *breakdown.STEPS}
    row = {"request_id": "a", "path": "gateway_grpc", "t0": 10**12 - 500_000, "t1": 10**12 + 12_800_000}
    seg = breakdown.segments(row, traces["a"])
    assert seg["client+gateway in"] == 1.5
    assert [round(seg[f"preprocess {k}"], 9) for k in ("queue", "input", "execute")] == [0.2, 0.1, 2.7]
    assert abs(seg["scheduler->classifier_onnx"] - 0.8) < 1e-9
    assert seg["gateway+client out"] == 0.5
    assert abs(seg["ensemble->response"] - 0.6) < 1e-9  # postprocess's COMPUTE_OUTPUT_START 11.5 -> send 12.1 ms
    assert abs(sum(v for k, v in seg.items() if k != "total") - seg["total"]) < 1e-9
    summary = breakdown.summarize([row], traces)
    assert summary["gateway_grpc"]["n"] == 1 and summary["gateway_grpc"]["median_ms"]["total"] == 13.3


def test_a_step_that_answers_before_execute_returns_ends_where_the_next_one_starts(tmp_path):
    """postprocess sends its answer, then exports its metrics: its COMPUTE_OUTPUT_START (when execute()
    returned) lies after the ensemble's GRPC_SEND_START; the path ends at the send, nothing is negative."""
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_trace("a", 10**12, 1, late_output={"postprocess": 5_000_000})))
    row = {"request_id": "a", "path": "gateway_grpc", "t0": 10**12 - 500_000, "t1": 10**12 + 12_800_000}
    seg = breakdown.segments(row, breakdown.read_traces(path)["a"])
    assert all(v >= 0 for v in seg.values()), seg
    assert abs(seg["postprocess execute"] - 3.3) < 1e-9  # COMPUTE_INPUT_END 8.8 ms -> GRPC_SEND_START 12.1 ms
    assert seg["ensemble->response"] == 0
    assert abs(sum(v for k, v in seg.items() if k != "total") - seg["total"]) < 1e-9


def test_incomplete_trace_is_left_out():
    row = {"request_id": "x", "path": "p", "t0": 0, "t1": 1}
    assert breakdown.segments(row, {"ensemble": {"GRPC_WAITREAD_END": 1}}) is None
    assert breakdown.summarize([row], {}) == {}


def test_a_trace_written_by_a_real_tritonserver_is_read_and_cut(keyring_path, keys, tmp_path):
    """The format above, checked against the real thing: a server started with bench's trace flags, tracing
    turned on through Triton's trace API (as ``make bench`` does), one request sent; the file Triton
    writes on exit is read by the real parser and cut into segments that add up to what the client measured."""
    require_model()
    trace_file = tmp_path / "trace.json"
    with TritonServer(keyring=str(keyring_path), audit_dir=str(tmp_path / "audit"), workdir=tmp_path / "triton",
                      extra_args=breakdown.trace_args(trace_file)) as srv:
        c = PipelineClient(srv.grpc_url, key=keys.key("k1"), key_id="k1", client_id="tracer")
        c.classify(samples.photo("coffee"), top_k=1)  # warm: the first request loads lazily, untraced
        kwargs = c.request(c.seal(samples.photo("coffee")), 1, "traced-1")
        breakdown.set_tracing(srv.http_url, True)
        t0 = time.monotonic_ns()
        c.result(kwargs, c.client.infer(**kwargs))
        t1 = time.monotonic_ns()
        breakdown.set_tracing(srv.http_url, False)
        c.close()
    traces = breakdown.read_traces(trace_file)  # written when the server stops
    assert set(traces) == {"traced-1"}, sorted(traces)
    trace = traces["traced-1"]
    assert set(trace) >= {"ensemble", *breakdown.STEPS}, sorted(trace)
    row = {"request_id": "traced-1", "path": "grpc", "t0": t0, "t1": t1}
    seg = breakdown.segments(row, trace)
    assert seg is not None, trace  # every stamp the cut needs is in the real file
    assert all(v >= 0 for v in seg.values()), seg  # Triton's stamps and the client's share one clock
    assert abs(sum(v for k, v in seg.items() if k != "total") - seg["total"]) < 1e-6
    assert {f"{step} execute" for step in breakdown.STEPS} <= set(seg)
    assert breakdown.summarize([row], traces)["grpc"]["n"] == 1
