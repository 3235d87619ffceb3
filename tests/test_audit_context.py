"""Issue 10 (1): an authenticated audit context. AUDIT_CTX sent straight to ``postprocess`` (the ensemble
bypassed, as Triton allows any inference client to do) is refused per request when forged, garbage,
stale, made for another request or already used; good requests of the same batch are served; no
forged record reaches the trail. Real server, real gRPC sockets on loopback."""
from __future__ import annotations

import asyncio
import json
import uuid

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from clients import samples
from rtinfer import audit_context, envelope, internal_key

from helpers import outcome, records_by_request


def preprocess_directly(server, keys) -> tuple[str, bytes]:
    """(request id, the genuine AUDIT_CTX preprocess answers for it)."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    sealed = envelope.seal(samples.photo("coffee"), keys.key("k1"), key_id="k1", client_id="ctx-user",
                           pipeline="pipeline")
    inp = grpcclient.InferInput("ENVELOPE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[sealed]], dtype=np.object_))
    rid = f"ctx-{uuid.uuid4().hex[:10]}"
    res = c.infer("preprocess", [inp], request_id=rid, outputs=[grpcclient.InferRequestedOutput("AUDIT_CTX")])
    c.close()
    return rid, bytes(res.as_numpy("AUDIT_CTX").reshape(-1)[0])


def postprocess_batch(server, rows: list[tuple[str, bytes]]) -> dict[str, str]:
    """Send (request id, AUDIT_CTX) rows to postprocess at once -> request id -> 'served' | outcome."""
    async def run():
        c = grpcaio.InferenceServerClient(server.grpc_url)

        async def one(rid, ctx):
            lg = grpcaio.InferInput("LOGITS", [1, 1000], "FP32")
            lg.set_data_from_numpy(np.full((1, 1000), 0.5, np.float32))
            cx = grpcaio.InferInput("AUDIT_CTX", [1, 1], "BYTES")
            cx.set_data_from_numpy(np.array([[ctx]], dtype=np.object_))
            try:
                await c.infer("postprocess", [lg, cx], request_id=rid)
                return rid, "served"
            except InferenceServerException as exc:
                return rid, outcome(exc)
        try:
            return dict(await asyncio.gather(*(one(r, x) for r, x in rows)))
        finally:
            await c.close()
    return asyncio.run(run())


def test_audit_context_sent_straight_to_postprocess(server, keys, audit_dir, keyring_path):
    key = internal_key.load_or_create(internal_key.resolve_path(keyring_path))
    good_rid, good_ctx = preprocess_directly(server, keys)
    good2_rid, good2_ctx = preprocess_directly(server, keys)
    other_rid, other_ctx = preprocess_directly(server, keys)
    body = json.loads(good_ctx)
    made_up = {**body, "request_id": "forged-1", "client_id": "victim"}
    stale = {**body, "request_id": "stale-1", "t_start_ns": body["t_start_ns"] - 10**12,
             "t_pre_done_ns": body["t_pre_done_ns"] - 10**12}  # 1000 s old, with a valid MAC
    rows = [(good_rid, good_ctx), (good2_rid, good2_ctx),
            ("forged-1", json.dumps(made_up).encode()),  # claims, with the copied (now wrong) MAC
            ("forged-2", audit_context.seal({**made_up, "request_id": "forged-2"}, b"k" * 32)),  # another key
            ("garbage-1", b"not json at all \xff"),
            ("stale-1", audit_context.seal(stale, key)),
            (f"not-{other_rid}", other_ctx)]  # a genuine context for another request id
    out = postprocess_batch(server, rows)
    assert out[good_rid] == out[good2_rid] == "served", out
    assert all(out[rid] == "invalid" for rid, _ in rows[2:]), out
    assert postprocess_batch(server, [(good_rid, good_ctx)]) == {good_rid: "invalid"}  # used once only

    recs = records_by_request(audit_dir)
    assert [r["event"] for r in recs[good_rid]] == ["served", "rejected"]
    assert recs[good_rid][1]["reason"] == "context_replayed"
    expected = {"forged-1": "context_forged", "forged-2": "context_forged", "garbage-1": "bad_context",
                "stale-1": "context_expired", f"not-{other_rid}": "context_request_id"}
    for rid, reason in expected.items():
        [rec] = recs[rid]
        assert rec["event"] == "rejected" and rec["reason"] == reason and rec["stage"] == "postprocess", rec
    everything = [r for rs in recs.values() for r in rs]
    assert not [r for r in everything if r.get("client_id") == "victim"], "a forged context's claims were audited"
