"""The postprocess stage: softmax, top-1 for the audit, and the served record.

Pure logic behind ``model_repository/postprocess/1/model.py``. Top-k for clients
comes from Triton's classification extension on the PROBS output (``class_count``).
"""
from __future__ import annotations

import json
import time

import numpy as np

from rtinfer.audit import AuditWriter
from rtinfer.preprocess import _now_iso


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class Postprocessor:
    def __init__(self, audit: AuditWriter, labels: tuple[str, ...], *, models: dict[str, str], version: str = "1"):
        self.audit = audit
        self.labels = labels
        self.models = models  # pipeline name -> "classifier model/version (sha256 prefix)"
        self.version = version

    def run(self, logits: np.ndarray, contexts: list[bytes], request_ids: list[str]) -> tuple[np.ndarray, list[str]]:
        """Batch of logits [N,1000] + audit contexts + Triton request ids -> probabilities and record hashes.

        The request id is the one Triton hands this last step, so the record shows it
        reached the end of the ensemble; preprocess saw the same id (``ctx``)."""
        started = time.time_ns()
        probs = softmax(logits.astype(np.float32))
        top = probs.argmax(axis=1)
        done = time.time_ns()
        records = []
        for i, raw in enumerate(contexts):
            ctx = json.loads(raw)
            idx = int(top[i])
            records.append({
                "event": "served", "stage": "postprocess", "time": _now_iso(),
                "request_id": request_ids[i], "client_id": ctx["client_id"], "key_id": ctx["key_id"],
                "envelope_sha256": ctx["envelope_sha256"], "pipeline": ctx["pipeline"],
                "models": {"preprocess": ctx["preprocess_version"], "postprocess": self.version,
                           "classifier": self.models.get(ctx["pipeline"], "unknown")},
                "top1": {"index": idx, "label": self.labels[idx], "score": round(float(probs[i, idx]), 6)},
                "timing_ms": {
                    "preprocess": round((ctx["t_pre_done_ns"] - ctx["t_start_ns"]) / 1e6, 3),
                    "classifier_incl_queues": round((started - ctx["t_pre_done_ns"]) / 1e6, 3),
                    "postprocess": round((done - started) / 1e6, 3),
                    "total": round((done - ctx["t_start_ns"]) / 1e6, 3),
                },
            })
        return probs, self.audit.append(records)
