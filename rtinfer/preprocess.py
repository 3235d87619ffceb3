"""The preprocess stage: open the envelope, decode the image, audit what is refused.

Pure logic behind ``model_repository/preprocess/1/model.py``; tests drive it directly.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import numpy as np

from rtinfer import audit_context, envelope, imaging, metrics
from rtinfer.audit import AuditWriter, now_iso
from rtinfer.errors import NOT_AUTHENTICATED, Refusal
from rtinfer.guard import CLIENT, attempt, refusal, unavailable
from rtinfer.internal_key import InternalKeys
from rtinfer.keyring import Keyring, KeyringSource
from rtinfer.replay import ReplayGuard

DEFAULT_MAX_ENVELOPE_BYTES = 8 * 1024 * 1024


@dataclass
class Request:
    envelope: bytes
    request_id: str = ""
    client_id: str = ""  # as the client declared it in request parameters (unauthenticated)
    count: int = 1  # envelopes in the Triton request; `envelope` is the first
    refused: Refusal | None = None  # the adapter could not read the request: refused, but still audited
    params: dict = field(default_factory=dict)  # the request's parameters (top_k, ...), for the stages after


def read_request(pb_utils, request) -> Request:
    """The stage's view of one Triton request (``ENVELOPE``); one that cannot be read is refused (and
    audited) alone. ``pb_utils`` is passed in by the adapter (preprocess, cascade): no Triton import here."""
    def read():
        params = json.loads(request.parameters() or "{}")
        params = params if isinstance(params, dict) else {}
        raw = pb_utils.get_input_tensor_by_name(request, "ENVELOPE").as_numpy().reshape(-1)
        return Request(envelope=bytes(raw[0]) if len(raw) else b"", request_id=str(request.request_id()),
                       client_id=str(params.get("client_id", "")), count=len(raw), params=params)
    req = attempt(read, blame=CLIENT)
    if isinstance(req, Refusal):
        rid = attempt(lambda: str(request.request_id()))
        req = Request(b"", request_id=rid if isinstance(rid, str) else "", refused=req)
    return req


@dataclass
class Accepted:
    image: np.ndarray  # UINT8 RGB [224, 224, 3]
    context: bytes  # JSON carried straight to postprocess (AUDIT_CTX), MAC'd (rtinfer.audit_context)
    plaintext: bytes | None = None  # keep_plaintext (the cascade): the image bytes, for the big model's own crop



class Preprocessor:
    """Checks run cheapest first: size, then authentication, freshness, replay, and only then decoding."""

    def __init__(self, keyring: Keyring | KeyringSource, audit: AuditWriter, *, pipelines: set[str],
                 replay: ReplayGuard | None = None,
                 max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
                 max_pixels: int = imaging.DEFAULT_MAX_PIXELS, version: str = "1",
                 crop: str = imaging.DEFAULT_CROP, crop_by_pipeline: dict[str, str] | None = None,
                 jpeg_draft: bool = True, ctx_key: bytes | InternalKeys | None = None,
                 keep_plaintext: bool = False, stage: str = "preprocess"):
        self.keys = keyring
        self.audit = audit
        self.replay = replay
        self.pipelines = set(pipelines)
        self.max_envelope_bytes = max_envelope_bytes
        self.max_pixels = max_pixels
        self.version = version
        self.crops = {p: (crop_by_pipeline or {}).get(p, crop) for p in self.pipelines}
        for policy in self.crops.values():
            if policy not in imaging.CROPS:
                raise ValueError(f"crop policy {policy!r} is not one of {imaging.CROPS}")
        self.jpeg_draft = jpeg_draft
        # The cascade: also keep the image bytes (decoded again at the big model's size if it escalates, so the
        # edge model sees exactly the pixels the pipeline's classifier sees), or re-sealed for a remote cloud.
        self.keep_plaintext = keep_plaintext
        self.stage = stage  # what its audit records name (the cascade runs this stage inside itself)
        self.ctx_key = ctx_key  # MACs AUDIT_CTX (server-internal key), so postprocess can trust it
        self.last = metrics.Report()  # what the last run() observed (outcomes, step timings), for the adapter

    @property
    def keyring(self) -> Keyring:
        return self.keys.current() if isinstance(self.keys, KeyringSource) else self.keys

    def _key_for(self, ring: Keyring):
        def key_for(header: envelope.Header) -> bytes:
            if header.kind != envelope.REQUEST:
                raise Refusal("not_a_request", "envelope is a sealed response, not a request")
            if header.pipeline not in self.pipelines:  # the detail is for the audit only: which pipelines
                raise Refusal("wrong_pipeline", f"envelope is sealed for pipeline '{header.pipeline}', "
                                      f"this service serves {sorted(self.pipelines)}", public=NOT_AUTHENTICATED)
            return ring.key(header.key_id)
        return key_for

    def _open(self, req: Request, ring: Keyring) -> envelope.Opened:
        if req.count != 1:  # one response per request: a batch would fail or pass as a whole, unaudited per item
            raise Refusal("batched_request", f"one envelope per request, got {req.count}: "
                                  "send them as separate requests (the server batches them itself)")
        if len(req.envelope) > self.max_envelope_bytes:
            raise Refusal("too_large", f"envelope is {len(req.envelope)} bytes, "
                                  f"more than the limit of {self.max_envelope_bytes}")
        with self.last.timed("decrypt_seconds"):
            opened = envelope.open_envelope(req.envelope, self._key_for(ring))
        hdr = opened.header
        if req.client_id and req.client_id != hdr.client_id:
            raise Refusal("client_mismatch", f"client id '{req.client_id}' in the request does not match "
                                  f"the envelope's sealed client id '{hdr.client_id}'")
        ring.check_client(hdr.key_id, hdr.client_id)  # the sealed id is the key holder's claim: is it theirs?
        return opened  # freshness and replay: ReplayGuard.admit, for the batch, in one transaction

    def _accept(self, req: Request, opened: envelope.Opened, started_ns: int) -> Accepted:
        hdr = opened.header
        with self.last.timed("decode_seconds"):
            image = imaging.preprocess(opened.plaintext, max_pixels=self.max_pixels, crop=self.crops[hdr.pipeline],
                                       draft=self.jpeg_draft)
        done_ns = time.time_ns()
        ctx = {
            "request_id": req.request_id, "client_id": hdr.client_id, "key_id": hdr.key_id,
            "pipeline": hdr.pipeline, "envelope_sha256": hashlib.sha256(req.envelope).hexdigest(),
            "sealed_at_ms": hdr.timestamp_ms, "preprocess_version": self.version,
            "seal_response": hdr.seal_response, "t_start_ns": started_ns, "t_pre_done_ns": done_ns,
        }
        key = self.ctx_key.current if isinstance(self.ctx_key, InternalKeys) else self.ctx_key
        if self.keep_plaintext:
            return Accepted(image, audit_context.seal(ctx, key), opened.plaintext)
        return Accepted(image, audit_context.seal(ctx, key))

    def run(self, requests: list[Request]) -> list[Accepted | Refusal]:
        """Process one batch; every request ends Accepted or refused on its own (never an exception).
        Refusals are audited together in one write before returning; a refusal that cannot be
        audited becomes retryable (fail closed: no unaudited answer)."""
        results: list = [None] * len(requests)
        started = [time.time_ns() for _ in requests]
        self.last = metrics.Report()
        ring = attempt(lambda: self.keyring)
        opened = {}
        for i, req in enumerate(requests):
            res = req.refused or (ring if isinstance(ring, Refusal) else attempt(self._open, req, ring, blame=CLIENT))
            if isinstance(res, Refusal):
                results[i] = res
            else:
                opened[i] = res
        admitted = self._admit(opened, results)
        for i in admitted:
            results[i] = attempt(self._accept, requests[i], opened[i], started[i], blame=CLIENT)
        refused = [i for i, r in enumerate(results) if isinstance(r, Refusal)]
        records = attempt(lambda: [self.rejection_record(requests[i], results[i], started[i]) for i in refused])
        written = records
        if records and not isinstance(records, Refusal):
            with self.last.timed("audit_write_seconds"):
                written = attempt(self.audit.append, records)
        if isinstance(written, Refusal):  # the audit is failing: nothing may be answered unaudited
            for i in refused:
                results[i] = unavailable("audit_unavailable", written.detail)
        if self.replay is not None:  # the server failed these: their envelopes may be sent again
            attempt(self.replay.release, [(opened[i].header.key_id, opened[i].nonce) for i in admitted
                                          if isinstance(results[i], Refusal) and results[i].retryable])
        outcomes = attempt(self._outcomes, requests, results, opened, records, ring)
        self.last.outcomes = [] if isinstance(outcomes, Refusal) else outcomes
        return results

    @staticmethod
    def _outcomes(requests, results, opened, records, ring) -> list[metrics.Outcome]:
        """Per request, for metrics: the authenticated client id if accepted (and whether its key binds it),
        else the claimed one and why."""
        claimed = iter(rec.get("claimed_client_id") or rec["client_id"] for rec in records) \
            if isinstance(records, list) else None
        return [metrics.Outcome(next(claimed) if claimed else requests[i].client_id, False, r.reason)
                if isinstance(r, Refusal) else metrics.Outcome(
                    opened[i].header.client_id, True,
                    bound=metrics.bound(ring, opened[i].header.key_id, opened[i].header.client_id))
                for i, r in enumerate(results)]

    def _admit(self, opened: dict[int, envelope.Opened], results: list) -> list[int]:
        """Window check and nonce insert for the batch's authenticated envelopes, in one transaction:
        the indexes admitted; the others get their refusal in ``results``."""
        order = sorted(opened)
        if self.replay is None or not order:
            return order
        with self.last.timed("replay_check_seconds"):
            verdicts = attempt(self.replay.admit, [(opened[i].header.key_id, opened[i].nonce,
                                                    opened[i].header.timestamp_ms) for i in order])
        if isinstance(verdicts, Refusal):  # store locked or failing: every one of them, retryable
            for i in order:
                results[i] = verdicts
            return []
        admitted = []
        for i, why in zip(order, verdicts):
            if why is None:
                admitted.append(i)
            else:
                results[i] = refusal(why)
        return admitted

    def rejection_record(self, req: Request, why: Refusal, started_ns: int) -> dict:
        """The audit record of a refused request (also the cascade's, when its edge model fails)."""
        rec = {
            "event": "rejected", "stage": self.stage, "time": now_iso(),
            "request_id": str(req.request_id), "client_id": str(req.client_id), "key_id": None,
            "envelope_sha256": hashlib.sha256(req.envelope).hexdigest(), "envelope_bytes": len(req.envelope),
            "reason": why.reason, "message": why.detail, "retryable": why.retryable,
            # what ran: the one pipeline this stage serves (each ensemble has its own preprocess); the header's
            # audience is only a claim here, as the client id is
            "pipeline": next(iter(self.pipelines)) if len(self.pipelines) == 1 else None,
            "preprocess_version": self.version,
            "timing_ms": {"preprocess": round((time.time_ns() - started_ns) / 1e6, 3)},
        }
        try:  # the header, when it parses, says who claims to have sent it (not authenticated if rejected)
            hdr = envelope.parse_header(req.envelope)[0]
            rec.update(key_id=hdr.key_id, claimed_client_id=hdr.client_id, claimed_pipeline=hdr.pipeline)
        except Refusal:
            pass
        return rec

