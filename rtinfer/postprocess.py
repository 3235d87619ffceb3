"""The postprocess stage: softmax, top-1 for the audit, the served record, and optionally a sealed result.

Pure logic behind ``model_repository/postprocess/1/model.py``. Top-k for clients
comes from Triton's classification extension on the PROBS output (``class_count``),
or, when the request's authenticated envelope header asks for it (``sr``, carried
here in the audit context), inside an envelope sealed to the request's own key:
then PROBS is all zeros and AUDIT_REF carries the sealed result, so a
TLS-terminating proxy sees neither the answer nor the audit reference. For those
requests the audit holds no result in clear either: ``top1_mac`` is a keyed hash
of (envelope hash, top-1 index) under the server-internal key, so the operator can
check a claimed answer and a reader of the log learns nothing.

Each row fails alone: a context that does not parse, is not authenticated, names
another request, is stale or was used before (``rtinfer.audit_context``), logits
that are not finite, a key gone between the stages are refused for that request,
audited; if the audit cannot be written, every row of the batch is refused as
retryable (nothing is served unaudited).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field

import numpy as np

from rtinfer import audit_context, envelope, metrics
from rtinfer.audit import AuditWriter, now_iso
from rtinfer.errors import Refusal
from rtinfer.guard import CLIENT, attempt, refusal, unavailable
from rtinfer.internal_key import InternalKeys, fingerprint
from rtinfer.keyring import Keyring, KeyringSource
from rtinfer.replay import ReplayGuard

NUM_CLASSES = 1000  # ImageNet-1k: the width of LOGITS and PROBS (rtinfer.labels.names())
MAX_TOP_K = NUM_CLASSES
STORE_REASONS = {"expired": ("context_expired", "AUDIT_CTX is stale: made longer ago than its freshness window"),
                 "from_future": ("context_from_future", "AUDIT_CTX was made in the future"),
                 "replayed": ("context_replayed", "AUDIT_CTX was already used for a served or refused request")}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k_of(params: dict, default: int = 5) -> int:
    try:
        return max(1, min(MAX_TOP_K, int(params.get("top_k", default))))
    except (TypeError, ValueError, OverflowError):
        return default


def result_mac(key: bytes, envelope_sha256: str, index: int) -> str:
    """What the audit holds instead of the result of a sealed response (checkable with the key only)."""
    return hmac.new(key, f"{envelope_sha256}:{index}".encode(), hashlib.sha256).hexdigest()


@dataclass
class Rows:
    """One Triton request to this stage: its rows' logits and audit contexts, its request id and parameters."""
    logits: np.ndarray  # [n, classes] float32
    contexts: list  # n AUDIT_CTX (bytes); [Refusal] for a request that could not be read (audited, answered alone)
    request_id: str = ""
    params: dict = field(default_factory=dict)


def read_request(pb_utils, request, classes: int = NUM_CLASSES) -> Rows:
    """The stage's view of one Triton request (``LOGITS`` [n, classes], ``AUDIT_CTX`` [n, 1]); one that cannot
    be read becomes one row whose context is its Refusal. ``pb_utils`` is passed in by the adapter: no Triton
    import here."""
    def read():
        params = json.loads(request.parameters() or "{}")
        lg = np.asarray(pb_utils.get_input_tensor_by_name(request, "LOGITS").as_numpy(), np.float32)
        lg = lg.reshape(-1, classes)
        ctx = pb_utils.get_input_tensor_by_name(request, "AUDIT_CTX").as_numpy().reshape(-1)
        if lg.shape[0] != len(ctx):
            raise ValueError("LOGITS and AUDIT_CTX have different batch sizes")
        return Rows(lg, [bytes(c) for c in ctx], str(request.request_id()), params if isinstance(params, dict) else {})
    rows = attempt(read, blame=CLIENT)
    if isinstance(rows, Refusal):
        rid = attempt(lambda: str(request.request_id()))
        rows = Rows(np.zeros((1, classes), np.float32), [rows], rid if isinstance(rid, str) else "")
    return rows


class Postprocessor:
    def __init__(self, audit: AuditWriter, labels: tuple[str, ...], *, models: dict[str, str], version: str = "1",
                 keyring: Keyring | KeyringSource | None = None, internal_keys: InternalKeys | None = None,
                 ctx_store: ReplayGuard | None = None, stage: str = "postprocess"):
        self.audit = audit
        self.stage = stage  # what its audit records name (the cascade runs this stage inside itself)
        self.labels = labels
        self.models = models  # pipeline name -> "classifier model/version (sha256 prefix)"
        self.version = version
        self.keys = keyring  # only needed to seal responses
        # Key the audit's stand-in for sealed results (None: no result at all) and check AUDIT_CTX's MAC
        # (None: unchecked, unit tests only).
        self.internal_keys = internal_keys
        self.ctx_store = ctx_store  # contexts used, for their freshness window
        self.last = metrics.Report()  # what the last run() observed (outcomes, timings), for the adapter

    @property
    def classes(self) -> int:
        """The width of LOGITS and PROBS: one label per class."""
        return len(self.labels)

    def run_requests(self, requests: list[Rows]) -> list:
        """``run`` for the adapter's batch of Triton requests: per request, its rows' probabilities [n, classes]
        and audit refs (record hash or sealed result), or the first Refusal among its rows (that request fails;
        the others of the batch do not). Never raises."""
        logits = (np.concatenate([r.logits for r in requests]) if requests
                  else np.zeros((0, self.classes), np.float32))
        contexts = [c for r in requests for c in r.contexts]
        ids = [r.request_id for r in requests for _ in r.contexts]
        params = [r.params for r in requests for _ in r.contexts]
        probs, refs = self.run(logits, contexts, ids, params)
        out, start = [], 0
        for r in requests:
            n = len(r.contexts)
            mine = refs[start:start + n]
            refused = [x for x in mine if isinstance(x, Refusal)]
            out.append(refused[0] if refused else (probs[start:start + n], mine))
            start += n
        return out

    def run(self, logits: np.ndarray, contexts: list[bytes], request_ids: list[str],
            params: list[dict] | None = None, routes: list[dict] | None = None) -> tuple[np.ndarray, list]:
        """Batch of logits [N, classes] + audit contexts + Triton request ids (+ request parameters)
        -> probabilities and, per row, the record hash (str), the sealed result (bytes), or the
        Refusal that failed that row alone. Never raises.

        The request id is the one Triton hands this last step, so the record shows it
        reached the end of the ensemble; preprocess saw the same id (``ctx``).

        ``routes`` (the cascade): per row, what its served record says about the route taken:
        ``route``, ``confidence``, ... and ``models`` (merged into the record's ``models``)."""
        started = time.time_ns()
        n = len(contexts)
        params = params or [{}] * n
        self.last = metrics.Report()
        out, ctxs = self._run(logits, contexts, request_ids, params, started, routes or [{}] * n)
        report = attempt(self._report, out, ctxs, params, n)
        if not isinstance(report, Refusal):
            self.last.outcomes = report
        return out

    def _report(self, result: tuple, ctxs: dict, params: list, n: int) -> list[metrics.Outcome]:
        """Per row, for metrics: the client id (from the MAC'd context, else as claimed) and why refused, whether
        its key binds it; the served rows' whole duration (preprocess start to the served record written)."""
        now, refs = time.time_ns(), result[1]
        ring = self.keys.current() if isinstance(self.keys, KeyringSource) else self.keys
        out = []
        for i in range(n):
            ctx = ctxs.get(i)
            client = ctx.get("client_id") if ctx else params[i].get("client_id", "")
            if isinstance(refs[i], Refusal):
                out.append(metrics.Outcome(client, False, refs[i].reason))
            else:
                out.append(metrics.Outcome(client, True, bound=metrics.bound(ring, ctx.get("key_id"), client)))
                self.last.add("request_duration_seconds", (now - ctx["t_start_ns"]) / 1e9)
        return out

    def _run(self, logits, contexts, request_ids, params, started, routes) -> tuple[tuple[np.ndarray, list], dict]:
        n = len(contexts)
        probs = attempt(lambda: softmax(np.asarray(logits, dtype=np.float32).reshape(n, -1)))
        if isinstance(probs, Refusal):
            return (np.zeros((n, len(self.labels)), np.float32), [probs] * n), {}
        done = time.time_ns()
        ring = attempt(lambda: self.keys.current() if isinstance(self.keys, KeyringSource) else self.keys)
        accepted = attempt(lambda: None if self.internal_keys is None else self.internal_keys.all())
        if isinstance(accepted, Refusal):
            return (np.zeros_like(probs), [accepted] * n), {}
        out: list = [None] * n
        records, ctxs, seal_keys = [], {}, {}
        opened, accepted = self._open_contexts(contexts, request_ids, accepted)
        for i, ctx in enumerate(opened):
            if isinstance(ctx, Refusal):
                out[i] = ctx
            else:
                ctxs[i] = ctx
        self._admit(ctxs, out)
        for i in range(n):
            ctx = ctxs.get(i, {})  # claims of a context that did not authenticate stay out of the record
            if out[i] is not None:
                records.append(self._rejected(request_ids[i], ctx, out[i]))
                continue
            record = attempt(self._served, request_ids[i], ctx, probs[i], started, done,
                             accepted[0] if accepted else None, routes[i], blame=CLIENT)
            if not isinstance(record, Refusal) and ctx.get("seal_response") is True:
                # The key opened this request moments ago; one retired in between fails this request alone.
                key = ring if isinstance(ring, Refusal) else attempt(ring.key, ctx["key_id"])
                if isinstance(key, Refusal):
                    record = key
                else:
                    seal_keys[i] = key
            if isinstance(record, Refusal):
                out[i] = record
                record = self._rejected(request_ids[i], ctx, record)
            records.append(record)
        with self.last.timed("audit_write_seconds"):
            hashes = attempt(self.audit.append, records)  # audited before anything is returned
        if isinstance(hashes, Refusal):
            return (np.zeros_like(probs), [unavailable("audit_unavailable", hashes.detail)] * n), ctxs
        for i in range(n):
            if out[i] is not None:
                continue
            out[i] = hashes[i]
            if i in seal_keys:
                out[i] = attempt(self.seal, probs[i], hashes[i], request_ids[i], ctxs[i],
                                 top_k_of(params[i]), seal_keys[i])
                probs[i] = 0.0
        return (probs, out), ctxs

    def _open_contexts(self, contexts: list, request_ids: list[str], accepted: list[bytes] | None) -> tuple:
        """Per row, the authenticated context or its Refusal (a row may already be one: the adapter could not
        read it), and the keys that checked them. Before a MAC failure counts as a forgery, the key file is
        read again, once: preprocess may have picked up a rotated key before this instance did."""
        def open_one(i, keys):
            return contexts[i] if isinstance(contexts[i], Refusal) else attempt(
                audit_context.open_context, contexts[i], keys, request_ids[i], blame=CLIENT)

        opened = [open_one(i, accepted) for i in range(len(contexts))]
        forged = [i for i, c in enumerate(opened) if isinstance(c, Refusal) and c.reason == "context_forged"]
        if forged and self.internal_keys is not None:
            fresh = attempt(self.internal_keys.all, fresh=True)
            if not isinstance(fresh, Refusal) and fresh != accepted:
                accepted = fresh
                for i in forged:
                    opened[i] = open_one(i, accepted)
        return opened, accepted

    def _admit(self, ctxs: dict[int, dict], out: list) -> None:
        """Freshness and single use of the authenticated contexts, in one transaction for the batch."""
        order = sorted(ctxs)
        if self.ctx_store is None or not order:
            return
        with self.last.timed("replay_check_seconds"):
            verdicts = attempt(self.ctx_store.admit, [(audit_context.STORE_KEY_ID, audit_context.nonce(ctxs[i]),
                                                       audit_context.issued_ms(ctxs[i])) for i in order])
        for k, i in enumerate(order):
            if isinstance(verdicts, Refusal):
                out[i] = verdicts
            elif verdicts[k] is not None:
                out[i] = refusal(Refusal(*STORE_REASONS.get(verdicts[k].reason, (
                    "context_refused", "AUDIT_CTX refused"))))

    def _base(self, request_id: str, ctx: dict) -> dict:
        return {"stage": self.stage, "time": now_iso(), "request_id": str(request_id),
                "client_id": ctx.get("client_id"), "key_id": ctx.get("key_id"),
                "envelope_sha256": ctx.get("envelope_sha256"), "pipeline": ctx.get("pipeline")}

    def _served(self, request_id: str, ctx: dict, probs: np.ndarray, started: int, done: int,
                result_key: bytes | None, route: dict | None = None) -> dict:
        if not np.isfinite(probs).all():
            raise Refusal("bad_logits", "the classifier's logits are not finite")
        idx = int(probs.argmax())
        sealed = ctx.get("seal_response") is True
        record = {
            "event": "served", **self._base(request_id, ctx),
            "models": {"preprocess": ctx["preprocess_version"], "postprocess": self.version,
                       "classifier": self.models.get(ctx["pipeline"], "unknown")},
            **{k: v for k, v in (route or {}).items() if k != "models"},
            "response_sealed": sealed,
            "timing_ms": {
                "preprocess": round((ctx["t_pre_done_ns"] - ctx["t_start_ns"]) / 1e6, 3),
                "classifier_incl_queues": round((started - ctx["t_pre_done_ns"]) / 1e6, 3),
                "postprocess": round((done - started) / 1e6, 3),
                "total": round((done - ctx["t_start_ns"]) / 1e6, 3),
            },
        }
        record["models"].update((route or {}).get("models", {}))
        if not sealed:
            record["top1"] = {"index": idx, "label": self.labels[idx], "score": round(float(probs[idx]), 6)}
        elif result_key is not None:  # the client asked for privacy: no result in clear, in the log either
            record.update(top1_mac=result_mac(result_key, ctx["envelope_sha256"], idx),
                          mac_key=fingerprint(result_key))
        return record

    def _rejected(self, request_id: str, ctx: dict, why: Refusal) -> dict:
        return {"event": "rejected", **self._base(request_id, ctx), "reason": why.reason, "message": why.detail,
                "retryable": why.retryable}

    def seal(self, probs: np.ndarray, audit_ref: str, request_id: str, ctx: dict, k: int, key: bytes) -> bytes:
        order = np.argsort(-probs, kind="stable")[:k]
        body = {"request_id": request_id, "audit_ref": audit_ref,
                "predictions": [[round(float(probs[j]), 6), int(j), self.labels[j]] for j in order]}
        return envelope.seal_response(json.dumps(body, separators=(",", ":")).encode(), key,
                                      key_id=ctx["key_id"], client_id=ctx["client_id"], pipeline=ctx["pipeline"],
                                      request_sha256=ctx["envelope_sha256"])
