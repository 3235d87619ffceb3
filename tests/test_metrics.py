"""Stage metrics (rtinfer.metrics): bounded labels, what a stage run reports, and the real export on
Triton's metrics port (preprocess and postprocess served alone: no classifier needed)."""
from __future__ import annotations

import shutil
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clients import samples
from rtinfer import audit, envelope, keyring, metrics, replay
from rtinfer.launch.server import ROOT, TritonServer
from rtinfer.preprocess import Preprocessor, Request

from conftest import settled
from helpers import metric_value as value, parse_metrics as parse

KEY = bytes(range(32))
def test_client_labels_are_bounded_and_forged_ids_take_no_slot():
    c = metrics.ClientLabels(["alice"], max_dynamic=2)
    assert c.label("alice", authenticated=False) == "alice"  # listed: even a refused claim is labelled
    assert c.label("", authenticated=True) == "none"
    assert [c.label(f"forged{i}", authenticated=False) for i in range(50)] == ["other"] * 50
    assert c.label("bob", authenticated=True) == "bob"
    assert c.label("bob", authenticated=False) == "bob"  # admitted once authenticated
    assert c.label("bad id\n{x}", authenticated=True) == "other"  # would break the exposition format
    assert c.label("carol", authenticated=True) == "carol"
    assert c.label("dave", authenticated=True) == "other"  # slots are used up
    assert metrics.reason_label("replayed") == "replayed" and metrics.reason_label("made-up") == "other"


def test_preprocess_run_reports_outcomes_by_authenticated_or_claimed_client_and_step_timings(tmp_path):
    pre = Preprocessor(keyring.Keyring({"k1": KEY}), audit.AuditWriter(tmp_path / "pre.jsonl"),
                       pipelines={"pipeline"}, replay=replay.ReplayGuard(tmp_path / "r.db"))
    good = envelope.seal(samples.photo("coffee"), KEY, key_id="k1", client_id="alice", pipeline="pipeline")
    forged = envelope.seal(b"x", bytes(32), key_id="k1", client_id="mallory", pipeline="pipeline")
    stale = envelope.seal(b"x", KEY, key_id="k1", client_id="bob", pipeline="pipeline", timestamp_ms=1)
    pre.run([Request(good, "a"), Request(forged, "f"), Request(stale, "s"), Request(good, "replay")])
    assert [(o.client_id, o.authenticated, o.reason) for o in pre.last.outcomes] == [
        ("alice", True, None), ("mallory", False, "auth_failed"), ("bob", False, "expired"),
        ("alice", False, "replayed")]
    t = pre.last.timings
    assert len(t["decrypt_seconds"]) == 4 and len(t["decode_seconds"]) == 1
    assert len(t["replay_check_seconds"]) == 1 and len(t["audit_write_seconds"]) == 1  # one group commit
    assert all(0 < v < 5 for vs in t.values() for v in vs)
    fresh = envelope.seal(samples.photo("coffee"), KEY, key_id="k1", client_id="alice", pipeline="pipeline")
    pre.run([Request(fresh, "fresh")])
    assert [o.reason for o in pre.last.outcomes] == [None]
    assert "audit_write_seconds" not in pre.last.timings  # nothing refused, nothing written
    pre.audit.close()
    pre.replay.close()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """preprocess (2 instances, 'alice' listed, 2 dynamic client slots) and postprocess on a real server."""
    tmp = tmp_path_factory.mktemp("metrics")
    repo = tmp / "repo"
    for model in ("preprocess", "postprocess"):
        shutil.copytree(ROOT / "model_repository" / model, repo / model, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = repo / "preprocess" / "config.pbtxt"
    text = cfg.read_text().replace("count: 1", "count: 2")
    text = text.replace('"metrics_clients" value: { string_value: "" }',
                        '"metrics_clients" value: { string_value: "alice" }')
    cfg.write_text(text.replace('"metrics_max_clients" value: { string_value: "20" }',
                                '"metrics_max_clients" value: { string_value: "2" }'))
    ring = keyring.write_new(tmp / "keyring.json", key_ids=("k1", "old"))
    keyring.retire_key(ring, "old", grace_s=0)
    with TritonServer(repo, models=("preprocess", "postprocess"), keyring=str(ring), audit_dir=str(tmp / "audit"),
                      workdir=tmp / "triton", config_name="cpu") as srv:
        srv.keys = keyring.Keyring.load(ring)
        yield srv


def _call(client, model, inputs, rid, cid):
    try:
        client.infer(model, inputs, request_id=rid, parameters={"client_id": cid})
        return "ok"
    except InferenceServerException as exc:
        return exc.status()


def _envelope_input(env: bytes):
    inp = httpclient.InferInput("ENVELOPE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[env]], dtype=np.object_))
    return inp


def test_stage_metrics_on_the_metrics_port(stages):
    c = httpclient.InferenceServerClient(stages.http_url)
    k1 = stages.keys.entries()["k1"].key
    old = stages.keys.entries()["old"].key
    photo = samples.photo("chelsea")
    sent = {"alice": 0, "bob": 0, "carol": 0, "dave": 0}
    for i in range(3):
        for cid in sent:
            env = envelope.seal(photo, k1, key_id="k1", client_id=cid, pipeline="pipeline")
            assert _call(c, "preprocess", [_envelope_input(env)], f"{cid}{i}", cid) == "ok"
            sent[cid] += 1
    replayed = envelope.seal(photo, k1, key_id="k1", client_id="alice", pipeline="pipeline")
    for i in range(3):  # the first is accepted, then two replays
        _call(c, "preprocess", [_envelope_input(replayed)], f"rep{i}", "alice")
    for i in range(40):  # forged envelopes under 40 made-up client ids
        env = envelope.seal(photo, bytes(32), key_id="k1", client_id=f"spray{i}", pipeline="pipeline")
        assert _call(c, "preprocess", [_envelope_input(env)], f"f{i}", f"spray{i}") == "400"
    for i in range(2):  # a retired key, claiming to be alice
        env = envelope.seal(photo, old, key_id="old", client_id="alice", pipeline="pipeline")
        assert _call(c, "preprocess", [_envelope_input(env)], f"old{i}", "alice") == "400"
    logits = httpclient.InferInput("LOGITS", [1, 1000], "FP32")
    logits.set_data_from_numpy(np.zeros((1, 1000), np.float32))
    ctx = httpclient.InferInput("AUDIT_CTX", [1, 1], "BYTES")
    ctx.set_data_from_numpy(np.array([[b'{"made":"up"}']], dtype=np.object_))
    assert _call(c, "postprocess", [logits, ctx], "pp", "bob") == "400"

    m = settled(lambda: {k: v for k, v in parse(urllib.request.urlopen(stages.metrics_url).read().decode()).items()
                         if k[0].startswith(metrics.PREFIX)})
    pre = {"stage": "preprocess"}
    # alice is listed; bob, carol, dave compete for 2 dynamic slots per instance (each instance folds on its
    # own), so every accepted request is counted under its own id or "other", and dave's 3 cannot all be own
    assert value(m, "rtinfer_requests_total", client="alice", outcome="accepted", **pre) == 4
    assert value(m, "rtinfer_requests_total", outcome="accepted", **pre) == 13
    for cid in ("bob", "carol", "dave"):
        assert value(m, "rtinfer_requests_total", client=cid, outcome="accepted", **pre) in (0, 3)
    assert value(m, "rtinfer_refusals_total", client="alice", reason="replayed", **pre) == 2
    assert value(m, "rtinfer_refusals_total", client="alice", reason="retired_key", **pre) == 2
    assert value(m, "rtinfer_refusals_total", client="other", reason="auth_failed", **pre) == 40
    clients = {dict(ls)["client"] for (n, ls) in m if n == "rtinfer_requests_total"}
    assert {"alice", "other"} <= clients <= {"alice", "bob", "carol", "dave", "other"}, clients  # no sprayed id
    # postprocess has admitted nobody: a refused claim to be bob is "other"
    assert value(m, "rtinfer_refusals_total", stage="postprocess", reason="bad_context", client="other") == 1
    # histograms: every envelope was opened, every accepted one decoded; refusals were audited
    assert value(m, "rtinfer_decrypt_seconds_count", **pre) == 12 + 3 + 40 + 2
    assert value(m, "rtinfer_decode_seconds_count", **pre) == 13
    assert value(m, "rtinfer_decode_seconds_bucket", le="+Inf", **pre) == 13
    assert value(m, "rtinfer_audit_records_total", **pre) == 2 + 40 + 2
    assert value(m, "rtinfer_audit_records_total", stage="postprocess") == 1
    assert value(m, "rtinfer_audit_write_errors_total") == 0
    assert value(m, "rtinfer_keyring_keys", state="active", **pre) == 1
    assert value(m, "rtinfer_keyring_keys", state="expired", **pre) == 1
    assert value(m, "rtinfer_replay_store_entries", store="nonces", **pre) >= 1
    assert value(m, "rtinfer_batch_requests_count", **pre) >= 1
