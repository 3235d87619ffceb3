"""The cascade's cloud leg (rtinfer/cloud_leg.py, what the edge's cascade model calls with a batch's escalated rows):
two promises of docs/cascade.md that no other test exercised (issue 23, section 4), against a real cloud
(tritonserver with gRPC over TLS, its inference key, and a keyring holding the edge's service key):

- a retry within the deadline is re-sealed, never a replay: the first attempt is admitted by the cloud
  (its nonce recorded) and then fails there (the server's trouble, retryable); the retry is a new envelope
  (another nonce, another SHA-256 in the cloud's own audit) and is served, where a replayed envelope would
  be refused as ``replayed``;
- a batch's escalations go out concurrently: while the cloud's answers are held back on the way, every
  escalation of the batch still reaches the cloud and is served there (asked one after the other, the
  second could not start before the first answer came back).

Between the edge's client and the cloud sits a TCP relay (this file): it forwards the bytes as they are (TLS
end to end), and on the test's word holds back what the cloud sends. It is the network, not a stand-in for
either side. The cloud serves ``pipeline`` (docs: "another Triton serving
cascade (or pipeline)"), so this needs no big model.
"""
from __future__ import annotations

import io
import json
import socket
import sqlite3
import threading
import uuid

import numpy as np
import pytest
from PIL import Image

from clients import samples
from rtinfer import access, audit, keyring
from rtinfer.cascade import CloudAnswer
from rtinfer.cloud_leg import CloudLeg
from rtinfer.launch.server import TritonServer
from rtinfer.preprocess import Accepted

from conftest import require_model
from helpers import records_for, wait_until

CLOUD_API_KEY = "cloud-promises-51e0"
SERVICE_KEY_ID, EDGE_ID = "edge-svc", "edge-node-1"


class Relay:
    """A loopback TCP relay to ``upstream``. ``hold()``: what the upstream sends is kept, not forwarded, until
    ``release()``."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.holding = False
        self.held: list[tuple[socket.socket, bytes]] = []
        self.conns: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.conns.append((client, server))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_upstream: bool):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            with self.lock:
                if from_upstream and self.holding:
                    self.held.append((dst, data))
                    continue
            try:
                dst.sendall(data)
            except OSError:
                return

    def hold(self):
        with self.lock:
            self.holding = True

    def release(self):
        with self.lock:
            self.holding = False
            held, self.held = self.held, []
            for dst, data in held:
                try:
                    dst.sendall(data)
                except OSError:
                    pass

    def close(self):
        self.listener.close()
        with self.lock:
            conns, self.conns, self.holding = self.conns, [], False
        for pair in conns:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes the relay's threads reading it
                    s.close()
                except OSError:
                    pass


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    require_model()
    d = tmp_path_factory.mktemp("cloud-promises")
    certs = access.loopback_certs(d / "tls")
    ring = keyring.write_new(d / "service-keyring.json", key_ids=(SERVICE_KEY_ID,), clients={SERVICE_KEY_ID: [EDGE_ID]})
    with TritonServer(keyring=str(ring), audit_dir=str(d / "audit"), api_key=CLOUD_API_KEY,
                      tls_cert=str(certs["server"]), tls_key=str(certs["server-key"]), workdir=d / "triton") as srv:
        srv.certs, srv.ring, srv.audit_dir = certs, ring, d / "audit"
        yield srv


@pytest.fixture
def relay(cloud):
    r = Relay((cloud.host, cloud.grpc_port))
    yield r
    r.close()


def cloud_leg(cloud, relay, **kw) -> CloudLeg:
    """The edge's cloud client as the cascade model builds it (model_repository/cascade/1/model.py), to the relay."""
    ring = keyring.Keyring.load(cloud.ring)
    return CloudLeg(relay.url, key=ring.key(SERVICE_KEY_ID), key_id=SERVICE_KEY_ID, client_id=EDGE_ID,
                    pipeline="pipeline", api_key=CLOUD_API_KEY, tls_ca=str(cloud.certs["ca"]),
                    **{"deadline_s": 60.0, "attempts": 2, **kw})


def small_photo(name: str = "coffee", side: int = 160) -> bytes:
    """A few KB: several requests fit in HTTP/2's flow-control windows while the cloud's side is held back
    (the window updates the client would wait for travel with it)."""
    img = Image.open(io.BytesIO(samples.photo(name))).convert("RGB")
    img.thumbnail((side, side))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def cloud_records(cloud, request_id: str) -> list[dict]:
    return records_for(cloud.audit_dir, request_id)


def served(cloud, request_id: str) -> bool:
    return any(r["event"] == "served" for r in cloud_records(cloud, request_id))


def test_a_retry_is_resealed_never_a_replay(cloud, relay):
    """The first attempt is admitted by the cloud (its nonce recorded by preprocess) and then fails there:
    the test holds the write lock of the cloud's context store (audit-ctx.sqlite3), so postprocess refuses
    it as the server's trouble (UNAVAILABLE, retryable) and audits it. The relay holds that answer back
    until the lock is let go, so the retry meets a healthy cloud, deterministically."""
    leg = cloud_leg(cloud, relay)
    photo = small_photo()
    ctx_db = cloud.audit_dir / "audit-ctx.sqlite3"
    assert ctx_db.exists()
    try:
        assert leg.ask(photo, f"warm-{uuid.uuid4().hex[:8]}") is not None, list(leg.last_errors)  # channel up
        rid = f"retry-{uuid.uuid4().hex[:8]}"
        lock = sqlite3.connect(ctx_db, isolation_level=None, timeout=30)
        lock.execute("BEGIN EXCLUSIVE")
        relay.hold()
        answer: list = []
        t = threading.Thread(target=lambda: answer.append(leg.ask(photo, rid)))
        t.start()
        try:
            assert wait_until(lambda: any(r["event"] == "rejected" for r in cloud_records(cloud, f"{rid}.cloud0")),
                              timeout=60), cloud_records(cloud, f"{rid}.cloud0")
        finally:
            lock.rollback()
            lock.close()
            relay.release()  # the first attempt's refusal reaches the edge now: it retries
        t.join(timeout=90)
        assert not t.is_alive()
    finally:
        leg.close()
    [ans] = answer
    first, retry = cloud_records(cloud, f"{rid}.cloud0"), cloud_records(cloud, f"{rid}.cloud1")
    # the first attempt: admitted by preprocess (no refusal of its own), refused by postprocess, retryable
    assert [(r["stage"], r["event"], r["retryable"]) for r in first] == [("postprocess", "rejected", True)], first
    assert len(leg.last_errors) == 1 and "UNAVAILABLE" in leg.last_errors[0], list(leg.last_errors)
    # the retry, within the deadline: served, not refused as a replay
    assert [(r["stage"], r["event"]) for r in retry] == [("postprocess", "served")], retry
    assert ans is not None, list(leg.last_errors)
    assert not any(r.get("reason") == "replayed" for r in first + retry)
    # two envelopes: another nonce, so another SHA-256 of the envelope, in the cloud's own audit
    assert first[0]["envelope_sha256"] != retry[0]["envelope_sha256"]
    assert {r["client_id"] for r in first + retry} == {EDGE_ID}
    assert abs(float(np.sum(ans.probs)) - 1.0) < 1e-3 and ans.model == f"remote:{relay.url}/pipeline"


def rows(photo: bytes, ids: list[str]) -> list[Accepted]:
    """What the cascade passes its cloud callable for a batch's escalated rows (rtinfer.cascade.Cascade.run):
    accepted requests with their image bytes and audit context (request id)."""
    return [Accepted(np.zeros((224, 224, 3), np.uint8), json.dumps({"request_id": rid}).encode(), photo) for rid in ids]


def test_a_batchs_escalations_go_out_concurrently(cloud, relay):
    n = 4
    leg = cloud_leg(cloud, relay)
    photo = small_photo()
    try:
        assert leg.ask(photo, f"warm-{uuid.uuid4().hex[:8]}") is not None, list(leg.last_errors)
        ids = [f"batch-{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]
        relay.hold()  # no answer reaches the edge until every escalation of the batch is served by the cloud
        answers: list = []
        t = threading.Thread(target=lambda: answers.extend(leg(rows(photo, ids))))
        t.start()
        all_in = wait_until(lambda: all(served(cloud, f"{rid}.cloud0") for rid in ids), timeout=60)
        seen_while_held = [rid for rid in ids if served(cloud, f"{rid}.cloud0")]
        relay.release()
        t.join(timeout=90)
        assert not t.is_alive()
    finally:
        leg.close()
    # asked one after the other, only the first could have reached the cloud while its answer was held
    assert all_in, f"served by the cloud while the answers were held back: {seen_while_held} of {ids}"
    assert len(answers) == n and all(isinstance(a, CloudAnswer) for a in answers), list(leg.last_errors)
    assert relay.accepted == 1  # one connection: the asks were multiplexed on it, not spread over channels
    recs = [r for rid in ids for r in cloud_records(cloud, f"{rid}.cloud0") if r["stage"] == "postprocess"]
    assert len({r["envelope_sha256"] for r in recs}) == n
    assert all(r.ok for reps in audit.verify_path(cloud.audit_dir).values() for r in reps)
