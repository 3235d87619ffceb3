"""The cascade stage: open the envelope, ask the edge model, escalate when it is unsure, audit the route.

Pure logic behind ``model_repository/cascade/1/model.py``: the adapter passes in how to run
the edge classifier and how to ask the cloud (the big model in this server through BLS, or
another Triton over gRPC: ``rtinfer.cloud_leg``). Envelope checks, replay guard and rejection audit
are ``rtinfer.preprocess.Preprocessor``'s, the served record and sealed responses
``rtinfer.postprocess.Postprocessor``'s (the same code as the pipeline, writing to one audit
chain per cascade instance); the decision is ``rtinfer.routing``'s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rtinfer import imaging, routing
from rtinfer.errors import Refusal
from rtinfer.guard import attempt, unavailable
from rtinfer.postprocess import Postprocessor, softmax
from rtinfer.preprocess import Accepted, Preprocessor, Request


@dataclass
class CloudAnswer:
    """What the cloud said about one escalated row: its probabilities and which model answered."""
    probs: np.ndarray  # [1000]
    model: str
    ms: float


@dataclass
class CloudMiss:
    """Why the cloud gave no answer for one escalated row ("breaker open", "deadline spent", the last
    call's error): the edge answers it as edge_fallback, and the served record says why (``cloud_error``)."""
    why: str


# edge(images uint8 [n,224,224,3]) -> logits [n,1000]; cloud(accepted rows) -> per row a CloudAnswer, or a
# CloudMiss or None (the cloud could not answer in time; the edge answer is returned as edge_fallback).
EdgeFn = Callable[[np.ndarray], np.ndarray]
CloudFn = Callable[[list[Accepted]], list["CloudAnswer | CloudMiss | None"]]


class Cascade:
    def __init__(self, pre: Preprocessor, post: Postprocessor, policy: routing.Policy, *, edge_model: str,
                 cloud_model: str):
        self.pre, self.post, self.policy = pre, post, policy
        self.edge_model, self.cloud_model = edge_model, cloud_model  # ids for the audit record
        self.last_routes: list[str] = []  # the routes the last run() answered by, for the adapter's metrics

    def run(self, requests: list[Request], params: list[dict], edge: EdgeFn, cloud: CloudFn) -> list:
        """Per request: (probs [1000], audit ref or sealed result) or the Refusal that failed it alone."""
        self.last_routes = []
        started_ns = time.time_ns()
        results: list = self.pre.run(requests)
        rows = [i for i, r in enumerate(results) if isinstance(r, Accepted)]
        if not rows:
            return results
        t0 = time.perf_counter()
        logits = attempt(lambda: np.asarray(edge(np.stack([results[i].image for i in rows])), np.float32))
        if isinstance(logits, Refusal):
            return self._fail(results, rows, requests, unavailable("edge_unavailable", logits.detail), started_ns)
        edge_ms = (time.perf_counter() - t0) * 1e3
        escalate, conf = self.policy.decide(softmax(logits))
        up = [k for k in range(len(rows)) if escalate[k]]
        answers = attempt(cloud, [results[rows[k]] for k in up]) if up else []
        if isinstance(answers, Refusal) or len(answers) != len(up):
            answers = [None] * len(up)  # whatever went wrong with the cloud: the edge answers
        final = logits.copy()
        routes = []
        for k in range(len(rows)):
            routes.append({"route": routing.EDGE, "confidence": round(float(conf[k]), 6),
                           "confidence_metric": self.policy.metric, "threshold": self.policy.threshold,
                           "edge_ms": round(edge_ms, 3),
                           "models": {"edge": self.edge_model, "cloud": self.cloud_model,
                                      "classifier": self.edge_model}})
        for k, ans in zip(up, answers):
            if ans is None or isinstance(ans, CloudMiss):
                routes[k]["route"] = routing.EDGE_FALLBACK
                if isinstance(ans, CloudMiss):
                    routes[k]["cloud_error"] = str(ans.why)[:200]
                continue
            final[k] = np.log(np.clip(np.asarray(ans.probs, np.float64), 1e-30, None)).astype(np.float32)
            routes[k].update(route=routing.CLOUD, cloud_ms=round(ans.ms, 3))
            routes[k]["models"]["classifier"] = ans.model
        probs, refs = self.post.run(final, [results[i].context for i in rows], [requests[i].request_id for i in rows],
                                    [params[i] for i in rows], routes)
        for k, i in enumerate(rows):
            results[i] = refs[k] if isinstance(refs[k], Refusal) else (probs[k], refs[k])
        self.last_routes = [routes[k]["route"] for k, i in enumerate(rows) if not isinstance(refs[k], Refusal)]
        return results

    def _fail(self, results: list, rows: list[int], requests: list[Request], why: Refusal, started_ns: int) -> list:
        """The edge model failed: those requests are refused as retryable, audited (UNAVAILABLE either way).
        Their nonces stay recorded: a client retries with a newly sealed envelope
        (docs/architecture.md "Errors clients get")."""
        attempt(self.pre.audit.append, [self.pre.rejection_record(requests[i], why, started_ns) for i in rows])
        for i in rows:
            results[i] = why
        return results


class LocalCloud:
    """The cloud in this server: the big classifier (``infer``: images uint8 [n,size,size,3] -> logits) on the
    escalated rows' own image bytes, decoded and cropped at its size (the model card's transform for it:
    shorter side to size + 32, centre crop), with the preprocessor's limits."""

    def __init__(self, infer: EdgeFn, pre: Preprocessor, *, size: int, model_id: str):
        self.infer, self.pre, self.size, self.model_id = infer, pre, size, model_id

    def __call__(self, rows: list[Accepted]) -> list[CloudAnswer]:
        t0 = time.perf_counter()
        x = np.stack([imaging.preprocess(r.plaintext, max_pixels=self.pre.max_pixels, draft=self.pre.jpeg_draft,
                                         size=self.size) for r in rows])
        probs = softmax(np.asarray(self.infer(x), np.float32))
        ms = (time.perf_counter() - t0) * 1e3
        return [CloudAnswer(p, self.model_id, ms) for p in probs]
