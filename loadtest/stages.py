"""What each step of one request costs inside the stages, timed in-process with the stages' own code.

Triton's trace (``loadtest.breakdown``) sees a stage's compute from outside the stub;
this times the Python work inside it on the same photo, keys, audit directory and
model file, so the difference between the two is the stub hop (IPC, tensor
conversion). Steps are timed one after another per iteration, interleaved, and
reported as medians in milliseconds.
"""
from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from rtinfer import audit_context, envelope, imaging, internal_key, labels, replay
from rtinfer.audit import AuditWriter
from rtinfer.keyring import Keyring
from rtinfer.postprocess import Postprocessor, softmax
from rtinfer.preprocess import Preprocessor, Request

STEPS = ("decrypt", "replay_check", "decode", "to_rgb", "resize_crop", "audit_ctx_seal", "preprocess_total",
         "ort", "audit_ctx_check", "softmax", "audit_write", "postprocess_total")


def _ms(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


def measure(photo: bytes, key: bytes, session, *, n: int = 60, fsync: str = "interval",
            audit_dir: Path | None = None) -> dict[str, float]:
    """Median ms per step for one request of ``photo``. ``session``: an ONNX Runtime session
    configured as the classifier is (None: the ORT step is left out)."""
    tmp = tempfile.TemporaryDirectory(dir=audit_dir)
    where = Path(tmp.name)
    keys = internal_key.InternalKeys(where / "server-internal.key")  # made on first use, as the stages do
    ctx_key = keys.current
    writer = AuditWriter(where / "pre.jsonl", fsync=fsync)
    post_writer = AuditWriter(where / "post.jsonl", fsync=fsync)
    guard = replay.ReplayGuard(where / "nonces.sqlite3")
    ctx_store = replay.ReplayGuard(where / "ctx.sqlite3", window_s=60.0, future_skew_s=5.0)
    ring = Keyring({"k1": key})
    pre = Preprocessor(ring, writer, pipelines={"pipeline"}, replay=guard, ctx_key=keys)
    post = Postprocessor(post_writer, labels.names(), models={"pipeline": "classifier_onnx/1"},
                         internal_keys=keys, ctx_store=ctx_store)
    times: dict[str, list[float]] = {s: [] for s in STEPS}
    try:
        for i in range(n + 5):
            sealed = envelope.seal(photo, key, key_id="k1", client_id="bench", pipeline="pipeline")
            rid = uuid.uuid4().hex
            t = {}
            t0 = time.perf_counter_ns()
            opened = envelope.open_envelope(sealed, lambda h: key)
            t["decrypt"] = _ms(t0)
            t0 = time.perf_counter_ns()
            guard.admit([("k1x", opened.nonce, opened.header.timestamp_ms)])
            t["replay_check"] = _ms(t0)
            t0 = time.perf_counter_ns()
            img = imaging.decode(opened.plaintext)
            t["decode"] = _ms(t0)
            t0 = time.perf_counter_ns()
            img = imaging.to_rgb(img)
            t["to_rgb"] = _ms(t0)
            t0 = time.perf_counter_ns()
            arr = imaging.to_array(imaging.fit(img))
            t["resize_crop"] = _ms(t0)
            t0 = time.perf_counter_ns()
            audit_context.seal({"request_id": rid, "t_start_ns": 1, "t_pre_done_ns": time.time_ns()}, ctx_key)
            t["audit_ctx_seal"] = _ms(t0)
            t0 = time.perf_counter_ns()
            accepted = pre.run([Request(sealed, request_id=rid, client_id="bench")])[0]
            t["preprocess_total"] = _ms(t0)
            if session is not None:
                t0 = time.perf_counter_ns()
                logits = session.run(None, {session.get_inputs()[0].name: arr[np.newaxis]})[0]
                t["ort"] = _ms(t0)
            else:
                logits = np.zeros((1, 1000), np.float32)
            t0 = time.perf_counter_ns()
            audit_context.open_context(accepted.context, keys.all(), rid)
            t["audit_ctx_check"] = _ms(t0)
            t0 = time.perf_counter_ns()
            softmax(logits)
            t["softmax"] = _ms(t0)
            t0 = time.perf_counter_ns()
            writer.append([{"event": "served", "request_id": rid, "timing_ms": {"x": 1.0}, "top1": {"index": 1}}])
            t["audit_write"] = _ms(t0)
            t0 = time.perf_counter_ns()
            post.run(logits, [accepted.context], [rid], [{}])
            t["postprocess_total"] = _ms(t0)
            if i >= 5:
                for k, v in t.items():
                    times[k].append(v)
    finally:
        for c in (writer, post_writer, guard, ctx_store):
            c.close()
        tmp.cleanup()
    return {k: round(statistics.median(v), 3) for k, v in times.items() if v}
