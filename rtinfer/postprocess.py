"""The postprocess stage: softmax, top-1 for the audit, the served record, and optionally a sealed result.

Pure logic behind ``model_repository/postprocess/1/model.py``. Top-k for clients
comes from Triton's classification extension on the PROBS output (``class_count``),
or, when the request asks for ``seal_response``, inside an envelope sealed to the
request's own key: then PROBS is all zeros and AUDIT_REF carries the sealed result,
so a TLS-terminating proxy sees neither the answer nor the audit reference.
"""
from __future__ import annotations

import json
import time

import numpy as np

from rtinfer import envelope
from rtinfer.audit import AuditWriter
from rtinfer.errors import RejectedRequest
from rtinfer.keyring import Keyring, KeyringSource
from rtinfer.preprocess import _now_iso

MAX_TOP_K = 1000


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def wants_sealed(params: dict) -> bool:
    return str(params.get("seal_response", "")).lower() in ("1", "true", "yes")


def top_k_of(params: dict, default: int = 5) -> int:
    try:
        return max(1, min(MAX_TOP_K, int(params.get("top_k", default))))
    except (TypeError, ValueError):
        return default


class Postprocessor:
    def __init__(self, audit: AuditWriter, labels: tuple[str, ...], *, models: dict[str, str], version: str = "1",
                 keyring: Keyring | KeyringSource | None = None):
        self.audit = audit
        self.labels = labels
        self.models = models  # pipeline name -> "classifier model/version (sha256 prefix)"
        self.version = version
        self.keys = keyring  # only needed to seal responses

    def run(self, logits: np.ndarray, contexts: list[bytes], request_ids: list[str],
            params: list[dict] | None = None) -> tuple[np.ndarray, list]:
        """Batch of logits [N,1000] + audit contexts + Triton request ids (+ request parameters)
        -> probabilities and, per row, the record hash (str), the sealed result (bytes), or the
        RejectedRequest that failed that row alone.

        The request id is the one Triton hands this last step, so the record shows it
        reached the end of the ensemble; preprocess saw the same id (``ctx``)."""
        started = time.time_ns()
        params = params or [{}] * len(contexts)
        probs = softmax(logits.astype(np.float32))
        top = probs.argmax(axis=1)
        done = time.time_ns()
        ring = self.keys.current() if isinstance(self.keys, KeyringSource) else self.keys
        records, ctxs, seal_keys, failed = [], [], {}, {}
        for i, raw in enumerate(contexts):
            ctx = json.loads(raw)
            ctxs.append(ctx)
            if wants_sealed(params[i]):
                # The key opened this request moments ago; a retired key still answers in its grace period,
                # but one retired in between must fail this request alone, audited, not the batch.
                try:
                    seal_keys[i] = ring.key(ctx["key_id"])
                except RejectedRequest as exc:
                    failed[i] = exc
            idx = int(top[i])
            record = {
                "event": "served", "stage": "postprocess", "time": _now_iso(),
                "request_id": request_ids[i], "client_id": ctx["client_id"], "key_id": ctx["key_id"],
                "envelope_sha256": ctx["envelope_sha256"], "pipeline": ctx["pipeline"],
                "models": {"preprocess": ctx["preprocess_version"], "postprocess": self.version,
                           "classifier": self.models.get(ctx["pipeline"], "unknown")},
                "top1": {"index": idx, "label": self.labels[idx], "score": round(float(probs[i, idx]), 6)},
                "response_sealed": wants_sealed(params[i]),
                "timing_ms": {
                    "preprocess": round((ctx["t_pre_done_ns"] - ctx["t_start_ns"]) / 1e6, 3),
                    "classifier_incl_queues": round((started - ctx["t_pre_done_ns"]) / 1e6, 3),
                    "postprocess": round((done - started) / 1e6, 3),
                    "total": round((done - ctx["t_start_ns"]) / 1e6, 3),
                },
            }
            if i in failed:
                del record["top1"]
                record.update(event="rejected", reason=failed[i].reason, message=str(failed[i]))
            records.append(record)
        refs: list = self.audit.append(records)  # audited before anything is returned
        for i, ctx in enumerate(ctxs):
            if i in failed:
                refs[i] = failed[i]
            elif i in seal_keys:
                refs[i] = self.seal(probs[i], refs[i], request_ids[i], ctx, top_k_of(params[i]), seal_keys[i])
                probs[i] = 0.0
        return probs, refs

    def seal(self, probs: np.ndarray, audit_ref: str, request_id: str, ctx: dict, k: int, key: bytes) -> bytes:
        order = np.argsort(-probs, kind="stable")[:k]
        body = {"request_id": request_id, "audit_ref": audit_ref,
                "predictions": [[round(float(probs[j]), 6), int(j), self.labels[j]] for j in order]}
        return envelope.seal_response(json.dumps(body, separators=(",", ":")).encode(), key,
                                      key_id=ctx["key_id"], client_id=ctx["client_id"], pipeline=ctx["pipeline"],
                                      request_sha256=ctx["envelope_sha256"])
