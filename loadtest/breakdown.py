"""Where the time of one request goes: Triton's trace timestamps joined with the client's clock.

Triton writes a trace per request (``--trace-config``, level TIMESTAMPS) for the
ensemble and for each composing model, stamped with CLOCK_MONOTONIC, the clock
``time.monotonic_ns()`` reads here: so the client's send and receive line up with
the server's own stamps on one time axis, and every gap has an owner:

- ``client+net in``: client serialization, the socket, the gateway (HAProxy waits for
  the whole gRPC body and its Lua walks the fields) until Triton has read the request;
- ``grpc->ensemble``, ``scheduler``: Triton's front end and ensemble scheduler between steps;
- per step: ``queue`` (dynamic batcher, incl. its max_queue_delay) and ``compute``
  (the stub hop: tensors to shared memory, the stub's Python, the answer back);
- ``net out+client``: Triton's write until the client has parsed the answer.

The Python inside each stage is timed in-process on the same photo (``loadtest.stages``)
and, for preprocess, inside the server too (the audit record's ``timing_ms``): the
step's compute minus that is what the stub hop costs.
"""
from __future__ import annotations

import json
import statistics
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

STEPS = ("preprocess", "classifier_onnx", "postprocess")


def trace_args(path: Path) -> list[str]:
    """tritonserver flags: traces go to ``path`` (written when the server exits), off until turned on."""
    return ["--trace-config", f"triton,file={path}", "--trace-config", "level=OFF",
            "--trace-config", "rate=1", "--trace-config", "count=-1"]


def set_tracing(http_url: str, on: bool, count: int = -1) -> dict:
    """Turn TIMESTAMPS tracing on/off at runtime (Triton's trace API, on its own loopback port)."""
    body = {"trace_level": ["TIMESTAMPS"] if on else ["OFF"], "trace_rate": "1", "trace_count": str(count)}
    req = urllib.request.Request(f"http://{http_url}/v2/trace/setting", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def timed_requests(clients: dict, make_request, n: int) -> list[dict]:
    """n requests per client, interleaved (client order alternates); per request its id, path and the
    client's monotonic send/receive stamps. ``make_request(client) -> (request_id, call)``: sealing and
    building the request happen before the clock starts."""
    rows, order = [], list(clients)
    for i in range(n):
        for name in (order if i % 2 else order[::-1]):
            rid, call = make_request(clients[name])
            t0 = time.monotonic_ns()
            call()
            t1 = time.monotonic_ns()
            rows.append({"request_id": rid, "path": name, "t0": t0, "t1": t1})
    return rows


def read_traces(path: Path) -> dict[str, dict]:
    """request id -> {"ensemble": stamps, step model name: stamps}; stamps = {NAME: ns}."""
    if not path.exists():
        return {}
    text = path.read_text().strip()
    items = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    info, stamps = {}, {}
    for it in items:
        tid = it["id"]
        if "model_name" in it:
            info[tid] = it
        for ts in it.get("timestamps", []):
            stamps.setdefault(tid, {}).setdefault(ts["name"], int(ts["ns"]))
    out: dict[str, dict] = {}
    for tid, meta in info.items():
        if meta.get("parent_id") in (None, 0) and not meta.get("parent_id"):
            rid = meta.get("request_id", "")
            out.setdefault(rid, {})["ensemble"] = stamps.get(tid, {})
            out[rid]["_id"] = tid
    by_tid = {v["_id"]: k for k, v in out.items() if "_id" in v}
    for tid, meta in info.items():
        parent = meta.get("parent_id")
        if parent and parent in by_tid:
            out[by_tid[parent]][meta["model_name"]] = stamps.get(tid, {})
    return out


def segments(row: dict, trace: dict) -> dict[str, float] | None:
    """One request's critical path in milliseconds, segment by segment (they add up to ``total``);
    None when its trace is incomplete. A step's answer is released to the next step at its
    COMPUTE_OUTPUT_START (its COMPUTE_END comes after the stub has cleaned up, off the path), or
    earlier for a step that sends it before ``execute()`` returns (postprocess: its metrics come
    after the answer, with no stamp at the send). Such a step's execute ends at the next step's
    REQUEST_START (the ensemble's SEND_START after the last step), so the scheduler's hand-off
    after it is counted in its execute."""
    ens = trace.get("ensemble", {})
    proto = "GRPC" if "GRPC_WAITREAD_END" in ens else "HTTP"
    first, send0, send1 = ((f"{proto}_WAITREAD_END", f"{proto}_SEND_START", f"{proto}_SEND_END") if proto == "GRPC"
                           else ("HTTP_RECV_END", "HTTP_SEND_START", "HTTP_SEND_END"))
    need = [(ens, k) for k in (first, "REQUEST_START", send0, send1)]
    need += [(trace.get(s, {}), k) for s in STEPS for k in ("REQUEST_START", "COMPUTE_START", "COMPUTE_INPUT_END",
                                                             "COMPUTE_OUTPUT_START")]
    if any(k not in d for d, k in need):
        return None
    chain = [("client+gateway in", row["t0"]), ("triton front end", ens[first]), ("", ens["REQUEST_START"])]
    chain[-1] = ("scheduler->preprocess", ens["REQUEST_START"])
    for i, step in enumerate(STEPS):
        st = trace[step]
        nxt = f"scheduler->{STEPS[i + 1]}" if i + 1 < len(STEPS) else "ensemble->response"
        next_start = trace[STEPS[i + 1]]["REQUEST_START"] if i + 1 < len(STEPS) else ens[send0]
        chain += [(f"{step} queue", st["REQUEST_START"]), (f"{step} input", st["COMPUTE_START"]),
                  (f"{step} execute", st["COMPUTE_INPUT_END"]), (nxt, min(st["COMPUTE_OUTPUT_START"], next_start))]
    chain += [("response write", ens[send0]), ("gateway+client out", ens[send1]), ("", row["t1"])]
    seg: dict[str, float] = {}
    for (name, a), (_, b) in zip(chain, chain[1:]):
        seg[name] = (b - a) / 1e6
    seg["total"] = (row["t1"] - row["t0"]) / 1e6
    return seg


def summarize(rows: list[dict], traces: dict[str, dict]) -> dict:
    """Per path: medians per segment over the requests whose traces are complete, and their count."""
    per_path: dict[str, list[dict]] = {}
    for row in rows:
        seg = segments(row, traces.get(row["request_id"], {}))
        if seg:
            per_path.setdefault(row["path"], []).append(seg)
    out = {}
    for path, segs in per_path.items():
        keys = segs[0].keys()
        out[path] = {"n": len(segs), "median_ms": {k: round(statistics.median(s[k] for s in segs), 3) for k in keys},
                     "p90_total_ms": round(float(np.percentile([s["total"] for s in segs], 90)), 3)}
    return out


def new_request_id() -> str:
    return uuid.uuid4().hex


def markdown(summary: dict, inside: dict[str, float], server_pre_ms: float | None, ort_ref: dict) -> str:
    """The breakdown table: segment medians per path, the in-process stage timings, the stub hop estimate."""
    paths = list(summary)
    if not paths:
        return "No complete traces (tracing unavailable on this server)."
    keys = list(summary[paths[0]]["median_ms"])
    lines = ["| segment | " + " | ".join(f"{p} (n={summary[p]['n']})" for p in paths) + " |",
             "|---|" + "---:|" * len(paths)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{summary[p]['median_ms'].get(k, 0):.2f}" for p in paths) + " |")
    if len(paths) >= 2 and "gateway_grpc" in summary and "direct_grpc" in summary:
        g, d = summary["gateway_grpc"]["median_ms"], summary["direct_grpc"]["median_ms"]
        gin = g["client+gateway in"] - d["client+gateway in"]
        gout = g["gateway+client out"] - d["gateway+client out"]
        lines += ["", f"Gateway (gRPC): total {g['total'] - d['total']:+.2f} ms; in {gin:+.2f} ms, out {gout:+.2f} ms."]
    if inside:
        lines += ["", "Inside the stages, same photo, timed in-process with the stages' code (median ms): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in inside.items()) + "."]
    ref = summary.get("gateway_grpc") or summary[paths[0]]
    med = dict(ref["median_ms"])
    for step in STEPS:
        med[f"{step} compute"] = med[f"{step} input"] + med[f"{step} execute"]
    hops = []
    if inside.get("preprocess_total") is not None:
        pre_py = server_pre_ms if server_pre_ms is not None else inside["preprocess_total"]
        hops.append(f"preprocess {med['preprocess compute'] - pre_py:.2f} (compute {med['preprocess compute']:.2f} - "
                    f"Python {pre_py:.2f}{' in the server' if server_pre_ms is not None else ''})")
    if inside.get("ort") is not None:
        hops.append(f"classifier {med['classifier_onnx compute'] - inside['ort']:.2f} "
                    f"(compute {med['classifier_onnx compute']:.2f} - ORT {inside['ort']:.2f})")
    if inside.get("postprocess_total") is not None:
        hops.append(f"postprocess {med['postprocess compute'] - inside['postprocess_total']:.2f} "
                    f"(compute {med['postprocess compute']:.2f} - Python {inside['postprocess_total']:.2f})")
    if hops:
        lines += ["", "Stub hop per step (Triton's input + execute - the Python inside, ms): " + "; ".join(hops) + "."]
    bare = sum(inside.get(k, 0.0) for k in ("decode", "to_rgb", "resize_crop", "ort"))
    if inside.get("ort") is not None:
        lines += ["", f"What the server adds to bare decode + crop + inference ({bare:.2f} ms in-process): "
                  f"**{med['total'] - bare:+.2f} ms** (median total {med['total']:.2f} ms, "
                  f"{'through the gateway' if 'gateway_grpc' in summary else paths[0]})."]
    if ort_ref:
        lines += ["", "Bare ONNX Runtime in-process, same photo, interleaved (p50 ms): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ort_ref.items()) + "."]
    return "\n".join(lines)


def server_preprocess_ms(audit_dir: Path, request_ids: set[str]) -> float | None:
    """Median of the preprocess Python time the server itself recorded (served records' ``timing_ms``)."""
    vals = []
    for f in audit_dir.glob("postprocess_*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "served" and rec.get("request_id") in request_ids:
                vals.append(rec["timing_ms"]["preprocess"])
    return round(statistics.median(vals), 3) if vals else None


def traced_requests(triton_http: str, clients: dict, make_request, n: int) -> list[dict]:
    """``timed_requests`` with Triton's tracing on for exactly those requests (off again afterwards)."""
    set_tracing(triton_http, True)
    try:
        return timed_requests(clients, make_request, n)
    finally:
        set_tracing(triton_http, False)
