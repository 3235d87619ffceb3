"""Fault and load tests on a real server (loopback, bounded): mixed good/bad load from several clients,
and a SIGKILL of the whole server during load followed by a restart on the same audit trail.

Counted: requests sent, answered, audited, lost (answered but not audited): lost must be 0.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import envelope

from conftest import model_repository_with, require_model
from helpers import records_by_request, start_server, verify_all

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
STAGE_PARAMS = {"audit_max_bytes": "30000", "audit_checkpoint_interval_s": "1"}
KINDS = ("good", "tampered", "replayed", "expired", "garbage", "good")
EXPECTED_REASON = {"tampered": "auth_failed", "replayed": "replayed", "expired": "expired", "garbage": "bad_format"}


start = start_server  # the old name (other modules import it here)


class Load:
    """Clients on threads, each sending a cycle of good and bad requests; every outcome is recorded."""

    def __init__(self, server, keys, clients=4, per_client=None, stop_after=None):
        self.server, self.keys, self.clients, self.per_client = server, keys, clients, per_client
        self.outcomes: dict[str, tuple[str, str]] = {}  # request id -> (kind, "served" | reason | "no answer")
        self.served: dict[str, tuple[str, bytes]] = {}  # request id -> (client id, envelope) of each good one served
        self.sent = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def envelope_for(self, kind, c, last_good):
        img = samples.photo("chelsea" if kind == "good" else "coffee")
        if kind == "tampered":
            b = bytearray(c.seal(img))
            b[-25] ^= 0x55
            return bytes(b)
        if kind == "replayed" and last_good is not None:
            return last_good
        if kind == "expired":
            return envelope.seal(img, c.key, key_id=c.key_id, client_id=c.client_id, pipeline="pipeline",
                                 timestamp_ms=int(time.time() * 1000) - 600_000)
        if kind == "garbage":
            return envelope.MAGIC + b"\x00\x05{oops" + bytes(40)
        return c.seal(img)

    def client_loop(self, n):
        protocol = "grpc" if n % 2 == 0 else "http"
        url = self.server.grpc_url if protocol == "grpc" else self.server.http_url
        c = PipelineClient(url, protocol=protocol, key=self.keys.key("k1"), key_id="k1", client_id=f"load-{n}",
                           **({"network_timeout": 30.0} if protocol == "http" else {}))
        last_good, i = None, 0
        while not self.stop.is_set() and (self.per_client is None or i < self.per_client):
            kind = KINDS[(i + n) % len(KINDS)]
            if kind == "replayed" and last_good is None:
                kind = "good"
            data = self.envelope_for(kind, c, last_good)
            rid = f"load-{n}-{i}-{uuid.uuid4().hex[:8]}"
            with self.lock:
                self.sent += 1
                self.outcomes[rid] = (kind, "no answer")
            try:
                c.infer_envelope(data, top_k=1, request_id=rid)
                outcome = "served"
                if kind == "good":
                    last_good = data
                    with self.lock:
                        self.served[rid] = (c.client_id, data)
            except InferenceServerException as exc:
                outcome = EXPECTED_REASON.get(kind, "error") \
                    if str(exc.status()) in ("400", "StatusCode.INVALID_ARGUMENT") else "no answer"
            except Exception:  # noqa: BLE001 - the connection died with the server: no answer
                outcome = "no answer"
            with self.lock:
                self.outcomes[rid] = (kind, outcome)
            i += 1
        try:
            c.close()
        except Exception:  # noqa: BLE001 - the server may be gone
            pass

    def run(self):
        self.threads = [threading.Thread(target=self.client_loop, args=(n,)) for n in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def join(self):
        for t in self.threads:
            t.join(120)

    def answered(self):
        with self.lock:
            return {rid: o for rid, o in self.outcomes.items() if o[1] != "no answer"}


def check_answered_are_audited(load, audit_dir):
    """Every answered request has exactly one record saying what the client was told. Returns the counts."""
    recs = records_by_request(audit_dir)
    answered = load.answered()
    lost = [rid for rid in answered if rid not in recs]
    assert not lost, f"answered but not audited: {lost[:5]}"
    for rid, (kind, outcome) in answered.items():
        [rec] = recs[rid]
        if outcome == "served":
            assert kind == "good" and rec["event"] == "served", (rid, kind, rec)
        else:
            assert rec["event"] == "rejected" and rec["reason"] == EXPECTED_REASON[kind], (rid, kind, rec)
    unanswered = [rid for rid in load.outcomes if rid not in answered]
    assert all(len(recs.get(rid, [])) <= 1 for rid in unanswered)
    return dict(sent=load.sent, answered=len(answered), audited=sum(rid in recs for rid in load.outcomes),
                lost=len(lost), in_flight_at_kill=len(unanswered))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return model_repository_with(tmp_path_factory.mktemp("repo"),
                                 {"preprocess": STAGE_PARAMS, "postprocess": STAGE_PARAMS})


def test_mixed_concurrent_load_every_request_answered_and_audited_once(repo, keyring_path, keys, signing_key,
                                                                       tmp_path):
    require_model()
    audit_dir = tmp_path / "audit"
    srv = start(repo, keyring_path, audit_dir, signing_key, tmp_path / "triton")
    try:
        load = Load(srv, keys, clients=4, per_client=30).run()
        load.join()
    finally:
        srv.stop()
    answered = load.answered()
    assert len(answered) == load.sent == 120, "every request is answered"
    kinds = Counter(k for k, _ in answered.values())
    assert all(o == "served" for k, o in answered.values() if k == "good")
    assert all(o == EXPECTED_REASON[k] for k, o in answered.values() if k != "good"), "bad ones all rejected"
    counts = check_answered_are_audited(load, audit_dir)
    chains = verify_all(audit_dir, signing_key)
    assert any(len(reports) > 1 for reports in chains.values()), "the load rotated at least one audit file"
    assert all(reports[-1].unsigned == 0 for reports in chains.values()), "a clean stop signs every chain"
    print(f"\nFAULT COUNTS mixed load: {counts}, kinds {dict(kinds)}, "
          f"files {sum(len(r) for r in chains.values())}")


def test_sigkill_during_load_then_restart_loses_nothing(repo, keyring_path, keys, signing_key, tmp_path):
    require_model()
    audit_dir = tmp_path / "audit"
    srv = start(repo, keyring_path, audit_dir, signing_key, tmp_path / "triton")
    try:
        load = Load(srv, keys, clients=4).run()
        deadline = time.monotonic() + 60
        while len(load.answered()) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        load.stop.set()  # each client finishes the request it has in flight: the kill lands under load
        srv.kill()  # SIGKILL to the server and its stub processes
        load.join()
    finally:
        srv.kill()
    counts = check_answered_are_audited(load, audit_dir)
    before = verify_all(audit_dir, signing_key, allow_torn=True)
    torn = sum(r.torn_tail for reps in before.values() for r in reps)
    heads = {c: reps[-1].next_seq for c, reps in before.items()}

    assert load.served, "no request was served before the kill"
    replay_rid, (replay_client, replay_env) = list(load.served.items())[-1]  # the last answered before the kill
    srv = start(repo, keyring_path, audit_dir, signing_key, tmp_path / "triton2")  # same audit trail and store
    try:
        c = PipelineClient(srv.grpc_url, key=keys.key("k1"), key_id="k1", client_id="after-restart")
        for _ in range(5):
            assert c.classify(samples.photo("coffee"), top_k=1).predictions[0].index == 967
        c.close()
        # the replay store survived the SIGKILL: an envelope served before it is refused after the restart
        again = PipelineClient(srv.grpc_url, key=keys.key("k1"), key_id="k1", client_id=replay_client)
        with pytest.raises(InferenceServerException) as info:
            again.infer_envelope(replay_env, top_k=1, request_id="replayed-after-restart")
        again.close()
    finally:
        srv.stop()
    assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT", info.value
    assert "already received (replay)" in info.value.message(), info.value.message()
    after = verify_all(audit_dir, signing_key)  # torn tails repaired, chains continued, all signed
    assert all(after[ch][-1].next_seq > heads[ch] for ch in heads if ch.startswith("postprocess"))
    assert all(reps[-1].unsigned == 0 for reps in after.values())
    recs = records_by_request(audit_dir)
    assert [r["event"] for r in recs[replay_rid]] == ["served"]  # the first time, before the kill
    [rec] = recs["replayed-after-restart"]
    assert (rec["event"], rec["reason"], rec["stage"]) == ("rejected", "replayed", "preprocess"), rec
    counts["torn_tails_at_kill"] = torn
    print(f"\nFAULT COUNTS sigkill: {counts}")
