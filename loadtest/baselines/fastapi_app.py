"""BASELINE, not the product: the server most users would write instead of the Triton pipeline.

One FastAPI app under uvicorn doing the same work per request with the same code:
open the envelope and decode (rtinfer.preprocess.Preprocessor, which also audits
refusals), ONNX Runtime on the same model file, softmax + served audit record
(rtinfer.postprocess.Postprocessor), top-k. No batching: each request runs alone in
Starlette's thread pool, as a plain `def` endpoint does.

    RTINFER_KEYRING=... RTINFER_AUDIT_DIR=... uvicorn loadtest.baselines.fastapi_app:app --port 9000
    POST /classify?top_k=5   body: the sealed envelope; header x-client-id
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from rtinfer import audit, labels
from rtinfer.keyring import Keyring
from rtinfer.launch.server import ROOT
from rtinfer.postprocess import Postprocessor
from rtinfer.preprocess import Accepted, Preprocessor, Request as StageRequest

MODEL = Path(os.environ.get("BASELINE_MODEL", ROOT / "model_repository" / "classifier_onnx" / "1" / "model.onnx"))
PIPELINE = "pipeline"  # the audience clients seal for: the same envelopes as the product


def _session() -> ort.InferenceSession:
    opts = ort.SessionOptions()
    threads = int(os.environ.get("BASELINE_ORT_THREADS", "0"))  # 0 = ONNX Runtime's default (all cores)
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])


_audit_dir = Path(os.environ[audit.ENV_DIR])
app = FastAPI(title="baseline: encrypted classification without Triton")
session = _session()
pre = Preprocessor(Keyring.from_env_or(None), audit.AuditWriter(_audit_dir / f"baseline_pre_{os.getpid()}.jsonl"),
                   pipelines={PIPELINE}, version="baseline")
post = Postprocessor(audit.AuditWriter(_audit_dir / f"baseline_post_{os.getpid()}.jsonl"), labels.names(),
                     models={PIPELINE: f"baseline-ort@{MODEL.name}"}, version="baseline")
NAMES = labels.names()


@app.post("/classify")
async def classify(request: Request, top_k: int = 5):
    """Read the raw envelope, then do the blocking work in the thread pool (as a `def` endpoint would)."""
    body = await request.body()
    return await run_in_threadpool(_work, body, request.headers.get("x-client-id", ""),
                                   request.headers.get("x-request-id") or uuid.uuid4().hex, top_k)


def _work(envelope: bytes, client_id: str, request_id: str, top_k: int):
    [result] = pre.run([StageRequest(envelope, request_id, client_id)])
    if not isinstance(result, Accepted):
        return JSONResponse({"error": result.message, "reason": result.reason}, status_code=400)
    logits = session.run(None, {"input": result.image[np.newaxis]})[0]
    probs, [ref] = post.run(logits, [result.context], [request_id])
    top = np.argsort(-probs[0])[:top_k]
    return {"request_id": request_id, "audit_ref": ref,
            "predictions": [{"score": float(probs[0, i]), "index": int(i), "label": NAMES[i]} for i in top]}
