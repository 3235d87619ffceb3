"""Fail closed, one request at a time, always audited (issue 14), on a real tritonserver over real sockets.

Each reproduction of the issue is a test here: a malformed image or an overflowing
timestamp in a dynamic batch, a downgraded sealed response, results of sealed
responses in the audit, a locked replay store; plus disk full (file size limit on
the stage processes) and a locked replay store under load, then a restart.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import sqlite3
import threading
import time
import uuid
from collections import Counter

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, envelope, internal_key
from rtinfer.errors import Refusal
from rtinfer.postprocess import result_mac

from conftest import model_repository_with, require_model
from helpers import batch_stats, outcome, palette_png_trns_no_plte, records_by_request, start_server, verify_all


def send_batches(server, keys, bad: list[bytes], good_per_round: int, protocol="grpc", tag="batch",
                 client_id="batcher"):
    """Rounds of one bad envelope and ``good_per_round`` good ones sent at once (so Triton batches them).
    -> {request id: ("good" | "bad", "served" | outcome)}"""
    url = server.grpc_url if protocol == "grpc" else server.http_url

    async def run():
        c = PipelineClient(url, protocol=protocol, aio=True, key=keys.key("k1"), key_id="k1", client_id=client_id)
        results = {}

        async def one(kind, sealed, rid):
            kwargs = c.request(sealed, 1, rid)
            try:
                res = c.result(kwargs, await c.client.infer(**kwargs))
                results[rid] = (kind, "served", res.predictions[0].index)
            except InferenceServerException as exc:
                results[rid] = (kind, outcome(exc), None)
        try:
            for r, data in enumerate(bad):
                jobs = [one("bad", data, f"{tag}-{r}-bad-{uuid.uuid4().hex[:6]}")]
                jobs += [one("good", c.seal(samples.photo("coffee")), f"{tag}-{r}-{i}-{uuid.uuid4().hex[:6]}")
                         for i in range(good_per_round)]
                await asyncio.gather(*jobs)
        finally:
            await c.close()
        return results
    return asyncio.run(run())


def sealed_with(keys, plaintext=None, **header):
    return envelope.seal(samples.photo("coffee") if plaintext is None else plaintext, keys.key("k1"), key_id="k1",
                         client_id="batcher", pipeline="pipeline", **header)


@pytest.mark.parametrize("case", ["palette PNG with tRNS and no PLTE", "ts of 401 digits"])
def test_one_bad_request_in_a_batch_fails_alone_and_is_audited(server, keys, audit_dir, case):
    """Issue 14 (1, 2): 1 bad + 9 good sent together, 6 rounds: every good one served, every bad one
    INVALID_ARG without traceback, audited; before, the batch failed with INTERNAL and a traceback."""
    make = {"palette PNG with tRNS and no PLTE": lambda: sealed_with(keys, palette_png_trns_no_plte()),
            "ts of 401 digits": lambda: sealed_with(keys, timestamp_ms=int("1" + "0" * 400))}[case]
    before = batch_stats(server, "preprocess")
    results = send_batches(server, keys, [make() for _ in range(6)], 9, tag=f"batch-{len(case)}")
    after = batch_stats(server, "preprocess")
    assert sum(after.get(b, 0) - before.get(b, 0) for b in after if b > 1) > 0, "no batch formed"
    good = [o for k, o, _ in results.values() if k == "good"]
    bad = [o for k, o, _ in results.values() if k == "bad"]
    assert good == ["served"] * 54 and bad == ["invalid"] * 6, (good, bad)
    assert all(idx == 967 for k, _, idx in results.values() if k == "good")
    recs = records_by_request(audit_dir)
    for rid, (kind, _, _) in results.items():
        [rec] = recs[rid]
        assert rec["event"] == ("served" if kind == "good" else "rejected")
        if kind == "bad":
            assert rec["reason"] in ("bad_image", "bad_input", "bad_format") and rec["stage"] == "preprocess"


def test_sealing_is_decided_by_the_sealed_header(server, keys, audit_dir, keyring_path):
    """Issue 14 (3, 4): no request parameter asks for sealing, so a proxy dropping one changes nothing;
    the client refuses a clear answer to a request that asked for a sealed one; the audit record of a
    sealed response holds a keyed hash, not the result; audit files are 0600."""
    c = PipelineClient(server.http_url, protocol="http", key=keys.key("k1"), key_id="k1", client_id="sealer")
    sealed_req = c.seal(samples.photo("coffee"), seal_response=True)
    raw = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("ENVELOPE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[sealed_req]], dtype=np.object_))
    out = raw.infer("pipeline", [inp], request_id="downgrade-1", parameters={"client_id": "sealer",
                                                                                "seal_response": "false"},
                    outputs=[httpclient.InferRequestedOutput("PROBS", binary_data=True, class_count=3),
                             httpclient.InferRequestedOutput("AUDIT_REF", binary_data=True)])
    reply = out.as_numpy("AUDIT_REF").reshape(-1)[0]
    assert reply.startswith(envelope.MAGIC)
    assert all(b"espresso" not in bytes(p) for p in out.as_numpy("PROBS").reshape(-1))
    body = json.loads(envelope.open_response(reply, keys.key("k1"), sealed_req).plaintext)
    assert body["predictions"][0][1:] == [967, "espresso"]
    [rec] = records_by_request(audit_dir)["downgrade-1"]
    assert rec["response_sealed"] is True and "top1" not in rec and "espresso" not in json.dumps(rec)
    key = internal_key.load_or_create(internal_key.resolve_path(keyring_path))
    assert rec["top1_mac"] == result_mac(key, hashlib.sha256(sealed_req).hexdigest(), 967)  # the operator can check
    for f in audit.audit_files(audit_dir):
        assert f.stat().st_mode & 0o777 == 0o600, f

    plain_kwargs = c.request(c.seal(samples.photo("coffee")), 1)
    clear = c.client.infer(**plain_kwargs)  # a real answer in clear ...
    wanted_sealed = c.request(c.seal(samples.photo("coffee"), seal_response=True), 1)
    with pytest.raises(Refusal, match="came in clear"):
        c.result(wanted_sealed, clear)  # ... is refused for a request that asked for a sealed one
    raw.close(), c.close()


def replay_db(audit_dir):
    return audit_dir / "replay-nonces.sqlite3"


def test_locked_replay_store_fails_fast_retryable_audited_and_burns_nothing(server, keys, audit_dir):
    """Issue 14 (7): a store locked by another writer stalled each request 30 s, then failed the batch
    with OperationalError and a traceback, unaudited. Now: UNAVAILABLE at once, audited; once the lock
    is gone the same envelopes are served (their nonces were not stored)."""
    c = PipelineClient(server.grpc_url, key=keys.key("k1"), key_id="k1", client_id="locked")
    envelopes = [c.seal(samples.photo("coffee")) for _ in range(3)]
    holder = sqlite3.connect(replay_db(audit_dir), isolation_level=None, timeout=10)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for i, sealed in enumerate(envelopes):
            t0 = time.monotonic()
            with pytest.raises(InferenceServerException) as info:
                c.infer_envelope(sealed, request_id=f"locked-{i}")
            assert time.monotonic() - t0 < 3 and outcome(info.value) == "unavailable", info.value
            assert "retry" in info.value.message()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    recs = records_by_request(audit_dir)
    for i in range(3):
        [rec] = recs[f"locked-{i}"]
        assert rec["event"] == "rejected" and rec["reason"] == "replay_store_unavailable" and rec["retryable"]
    for sealed in envelopes:
        assert c.infer_envelope(sealed, top_k=1).predictions[0].index == 967
    c.close()


def stage_processes(srv) -> dict[str, int]:
    """pid of the preprocess and postprocess stub processes of a running server (its process group)."""
    out = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(p)) != srv.proc.pid:
                continue
            cmd = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        for stage in ("preprocess", "postprocess"):
            if len(cmd) > 1 and cmd[1].endswith(f"/{stage}/1/model.py".encode()):
                out[stage] = int(p)
    return out


class MixedLoad:
    """Client threads sending good and garbage envelopes until stopped; every outcome kept by request id."""

    def __init__(self, srv, keys, clients=3):
        self.srv, self.keys = srv, keys
        self.outcomes: dict[str, tuple[str, str]] = {}
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.loop, args=(n,)) for n in range(clients)]
        for t in self.threads:
            t.start()

    def loop(self, n):
        protocol = "http" if n == 2 else "grpc"
        c = PipelineClient(self.srv.grpc_url if protocol == "grpc" else self.srv.http_url, protocol=protocol,
                           key=self.keys.key("k1"), key_id="k1", client_id=f"full-{n}")
        i = 0
        while not self.stop.is_set():
            kind = "good" if i % 3 else "garbage"
            data = c.seal(samples.photo("coffee")) if kind == "good" else envelope.MAGIC + b"\x00\x05{oops" + bytes(40)
            rid = f"full-{n}-{i}-{uuid.uuid4().hex[:6]}"
            try:
                c.infer_envelope(data, top_k=1, request_id=rid)
                result = "served"
            except InferenceServerException as exc:
                result = outcome(exc)
            with self.lock:
                self.outcomes[rid] = (kind, result)
            i += 1
        c.close()

    def count(self, what=None):
        with self.lock:
            return sum(1 for _, o in self.outcomes.values() if what is None or o == what)

    def wait_for(self, n, what=None, timeout=60):
        deadline = time.monotonic() + timeout
        goal = self.count(what) + n
        while self.count(what) < goal and time.monotonic() < deadline:
            time.sleep(0.05)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def check_every_answer_audited(outcomes, audit_dir):
    """Served and INVALID_ARG answers each have exactly one matching record; UNAVAILABLE ones at most one."""
    recs = records_by_request(audit_dir)
    for rid, (kind, result) in outcomes.items():
        found = recs.get(rid, [])
        if result == "served":
            assert kind == "good" and [r["event"] for r in found] == ["served"], (rid, found)
        elif result == "invalid":
            assert kind == "garbage" and [(r["event"], r["reason"]) for r in found] == [("rejected", "bad_format")]
        else:
            assert result == "unavailable", (rid, kind, result)
            assert len(found) <= 1 and all(r["event"] == "rejected" and r["retryable"] for r in found), found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_disk_full_and_locked_replay_store_under_load_then_restart(keyring_path, keys, signing_key, tmp_path):
    """Issue 14 (6, 7) under load: the replay store locked by another process, then the file size limit
    reached by both stage processes mid-write, then lifted. No answer other than served / INVALID_ARG /
    UNAVAILABLE; every served or refused answer audited; the chains verify (signatures included) and
    continue after a restart on the same trail."""
    require_model()
    repo = model_repository_with(tmp_path / "repo", {s: {"audit_checkpoint_interval_s": "0.5"}
                                                     for s in ("preprocess", "postprocess")})
    audit_dir = tmp_path / "audit"
    srv = start_server(repo, keyring_path, audit_dir, signing_key, tmp_path / "triton")
    try:
        load = MixedLoad(srv, keys)
        load.wait_for(30)
        holder = sqlite3.connect(replay_db(audit_dir), isolation_level=None, timeout=10)
        holder.execute("BEGIN IMMEDIATE")
        load.wait_for(6, "unavailable", timeout=20)
        holder.execute("ROLLBACK")
        holder.close()
        load.wait_for(6, "served")
        limits = {}
        for stage in ("postprocess", "preprocess"):  # one after the other: each stage's own full disk
            pid = stage_processes(srv)[stage]
            [live] = [f for f in audit.audit_files(audit_dir) if f.name.startswith(f"{stage}_")]
            limits[stage] = live.stat().st_size + 1500  # the next few records fit, then the "disk" is full
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limits[stage], resource.RLIM_INFINITY))
            load.wait_for(8, "unavailable", timeout=30)
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            load.wait_for(6, "served")
        load.wait_for(10, "served")
        load.finish()
    finally:
        srv.stop()
    counts = Counter(o for _, o in load.outcomes.values())
    assert counts["unavailable"] >= 22 and counts["served"] >= 30 and counts["invalid"] >= 5, counts
    check_every_answer_audited(load.outcomes, audit_dir)
    verify_all(audit_dir, signing_key)

    srv = start_server(repo, keyring_path, audit_dir, signing_key, tmp_path / "triton2")  # the same trail
    try:
        c = PipelineClient(srv.grpc_url, key=keys.key("k1"), key_id="k1", client_id="after")
        for _ in range(3):
            assert c.classify(samples.photo("coffee"), top_k=1).predictions[0].index == 967
        c.close()
    finally:
        srv.stop()
    chains = verify_all(audit_dir, signing_key)
    assert all(reps[-1].unsigned == 0 for reps in chains.values())
    print(f"\nFULL DISK + LOCKED STORE under load: {dict(counts)}, limits {limits}")
