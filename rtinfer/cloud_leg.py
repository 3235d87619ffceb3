"""The cascade's remote cloud leg: another Triton, asked over gRPC with TLS, never with the image in clear.

The edge re-seals the image bytes with its own service key (``rtinfer.envelope``) for the cloud's
pipeline and asks for a sealed response, so the answer travels encrypted too (top-k of all 1000
classes, i.e. the whole distribution). Each escalation has a deadline (``client_timeout`` per
attempt, retries only while time is left) and a circuit breaker (``rtinfer.routing.Breaker``): when
the cloud is slow, down or refuses, the row gets a ``CloudMiss`` saying why, and the cascade returns
the edge answer as ``edge_fallback`` with that reason in its audit record (``cloud_error``). Without
a CA it refuses to start (``rtinfer.access.require_tls``): a plaintext channel would hand the API key
to anyone on the path. Server side (the cascade model loads it): tritonclient only, no ``clients``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rtinfer import access, envelope, routing
from rtinfer.cascade import CloudAnswer, CloudMiss
from rtinfer.postprocess import NUM_CLASSES


class CloudLeg:
    def __init__(self, url: str, *, key: bytes, key_id: str, client_id: str, pipeline: str = "pipeline",
                 api_key: str = "", tls_ca: str | None = None, deadline_s: float = 1.0, attempts: int = 2,
                 min_attempt_s: float = 0.05, breaker: routing.Breaker | None = None, clock=time.monotonic,
                 max_concurrent: int = 8, insecure_loopback_only: bool = False):
        self.url, self.pipeline = url, pipeline
        # never plaintext to a remote cloud: the API key rides in every call's headers
        if access.require_tls(url, tls_ca, insecure_loopback_only):
            logging.getLogger(__name__).warning(
                "cloud leg to %s in PLAINTEXT (cloud_insecure_loopback_only): its API key and the answers are "
                "not encrypted; loopback development only", url)
        import tritonclient.grpc as grpcclient  # the stages that never call a cloud do not import it
        self.grpc = grpcclient
        self.key, self.key_id, self.client_id = key, key_id, client_id
        self.headers = access.headers("grpc", api_key)
        self.client = grpcclient.InferenceServerClient(url=url, **access.grpc_tls_kwargs(tls_ca))
        self.deadline_s, self.attempts, self.min_attempt_s = deadline_s, attempts, min_attempt_s
        self.breaker = breaker or routing.Breaker(clock=clock)
        self.clock = clock
        self.lock = threading.Lock()  # the breaker is shared by the batch's concurrent calls
        self.pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="cloud")
        self.last_errors: deque[str] = deque(maxlen=50)  # why the latest escalations fell back (logs, tests)

    @property
    def model_id(self) -> str:
        return f"remote:{self.url}/{self.pipeline}"

    def ask(self, plaintext: bytes, request_id: str) -> CloudAnswer | None:
        """One escalated image: the cloud's distribution, or None (deadline, errors, breaker open)."""
        answer = self.answer(plaintext, request_id)
        return answer if isinstance(answer, CloudAnswer) else None

    def answer(self, plaintext: bytes, request_id: str) -> CloudAnswer | CloudMiss:
        """``ask``, saying why when there is no answer (``CloudMiss``: the cascade's audit records it)."""
        deadline = routing.Deadline.start(self.deadline_s, self.clock)
        why = "no attempt"
        t0 = time.perf_counter()
        for n in range(self.attempts):
            # the deadline before the breaker: a half-open trial taken for a call that never starts would
            # never be given back, and the breaker would stay half-open, never asking the cloud again
            timeout = routing.next_timeout(deadline, n, self.attempts, self.min_attempt_s)
            if timeout is None:
                self.last_errors.append("deadline spent")
                return CloudMiss("deadline spent" if n == 0 else f"deadline spent after: {why}")
            with self.lock:
                if not self.breaker.allow():
                    self.last_errors.append("breaker open")
                    return CloudMiss("breaker open" if n == 0 else f"breaker open after: {why}")
            try:
                probs = self._infer(plaintext, f"{request_id}.cloud{n}", timeout)
            except Exception as exc:  # noqa: BLE001 - any failure of the cloud means: fall back
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
                self.last_errors.append(why)
                with self.lock:
                    self.breaker.failure()
                continue
            with self.lock:
                self.breaker.success()
            return CloudAnswer(probs, self.model_id, (time.perf_counter() - t0) * 1e3)
        return CloudMiss(why)

    def _infer(self, plaintext: bytes, request_id: str, timeout: float) -> np.ndarray:
        """One call: the image sealed for the cloud's pipeline, asking for the answer sealed back (top-k of all
        classes); the cloud's distribution [NUM_CLASSES]. Raises on any failure (the caller falls back)."""
        sealed = envelope.seal(plaintext, self.key, key_id=self.key_id, client_id=self.client_id,
                               pipeline=self.pipeline, seal_response=True)
        inp = self.grpc.InferInput("ENVELOPE", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[sealed]], dtype=np.object_))
        response = self.client.infer(self.pipeline, [inp], outputs=[self.grpc.InferRequestedOutput("AUDIT_REF")],
                                     request_id=request_id, headers=self.headers, client_timeout=timeout,
                                     parameters={"client_id": self.client_id, "top_k": NUM_CLASSES})
        ref = response.as_numpy("AUDIT_REF").reshape(-1)[0]
        answer = ref if isinstance(ref, bytes) else str(ref).encode()
        if not answer.startswith(envelope.MAGIC):
            raise envelope.Refusal("clear_response", "a sealed answer was asked for, but the answer came "
                                           "in clear: refused (downgraded on the way, or an old server)")
        body = json.loads(envelope.open_response(answer, self.key, sealed).plaintext)
        if body["request_id"] != request_id:
            raise ValueError("sealed response answers another request id")
        probs = np.zeros(NUM_CLASSES, np.float64)
        for score, index, _label in body["predictions"]:
            probs[int(index)] = float(score)
        return probs

    def __call__(self, rows) -> list[CloudAnswer | CloudMiss]:
        """The cascade's ``cloud`` callable: accepted rows (their image bytes and audit context) in order,
        asked concurrently, so a batch waits for its slowest escalation, not for their sum."""
        asks = [(row.plaintext, str(json.loads(row.context).get("request_id", ""))) for row in rows]
        if len(asks) <= 1:
            return [self.answer(*a) for a in asks]
        return list(self.pool.map(lambda a: self.answer(*a), asks))

    def close(self):
        self.pool.shutdown(wait=False)
        self.client.close()
