"""Replay protection: the freshness window and the shared nonce store, in the stage and on a real server.

Also the response cache: every repeated identical request is audited (a cache hit would skip the stages).
"""
from __future__ import annotations

import re
import time
import uuid

import pytest
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, envelope, replay
from rtinfer.errors import Refusal
from rtinfer.launch.server import ROOT
from rtinfer.preprocess import Accepted, Preprocessor, Request

NOW = 1_700_000_000_000


def test_window_refuses_old_and_future_envelopes(tmp_path):
    g = replay.ReplayGuard(tmp_path / "r.db", window_s=60, future_skew_s=5)
    g.check_window(NOW - 59_000, now_ms=NOW)
    g.check_window(NOW + 4_000, now_ms=NOW)
    for ts, reason in ((NOW - 61_000, "expired"), (NOW + 6_000, "from_future")):
        with pytest.raises(Exception) as info:
            g.check_window(ts, now_ms=NOW)
        assert info.value.reason == reason
    g.close()


def test_nonces_are_refused_the_second_time_also_inside_one_batch(tmp_path):
    g = replay.ReplayGuard(tmp_path / "r.db")
    assert g.record([("k1", b"a" * 12, NOW), ("k1", b"b" * 12, NOW), ("k1", b"a" * 12, NOW)], now_ms=NOW) \
        == [True, True, False]
    assert g.record([("k1", b"b" * 12, NOW), ("k2", b"b" * 12, NOW)], now_ms=NOW) == [False, True]
    g.close()


def test_store_is_shared_between_instances_and_survives_a_restart(tmp_path):
    """Two guards on one file stand for two Triton instances (separate processes in the server)."""
    a, b = replay.ReplayGuard(tmp_path / "r.db"), replay.ReplayGuard(tmp_path / "r.db")
    assert a.record([("k1", b"n" * 12, NOW)], now_ms=NOW) == [True]
    assert b.record([("k1", b"n" * 12, NOW)], now_ms=NOW) == [False]
    a.close(), b.close()
    c = replay.ReplayGuard(tmp_path / "r.db")
    assert c.record([("k1", b"n" * 12, NOW)], now_ms=NOW) == [False]
    c.close()


def test_store_is_bounded_by_the_window(tmp_path):
    """On the real clocks: entries older than window + margin go."""
    g = replay.ReplayGuard(tmp_path / "r.db", window_s=0.2, prune_margin_s=0.1, prune_every_s=0)
    ts = int(time.time() * 1000)
    g.record([("k1", i.to_bytes(12, "big"), ts) for i in range(500)])
    assert g.size() == 500
    time.sleep(0.4)
    g.record([("k1", b"x" * 12, int(time.time() * 1000))])  # the old ones are out of the window
    assert g.size() == 1
    g.close()


def test_a_clock_stepped_ahead_does_not_prune_what_the_real_clock_still_accepts(tmp_path):
    """Issue 20 (3): while the server's clock was 240 s ahead, an envelope stamped by it (inside the skew)
    was accepted and pruned the store by that clock; set right again, the clock still accepted an envelope
    sealed 200 s before, whose nonce was gone: its replay was served."""
    g = replay.ReplayGuard(tmp_path / "r.db", prune_every_s=0)  # 300 s window, 30 s skew
    a = ("k1", b"a" * 12, NOW - 200_000)
    assert g.admit([a], now_ms=NOW) == [None]
    assert g.admit([("k1", b"b" * 12, NOW + 240_000)], now_ms=NOW + 240_000) == [None]  # the clock ran ahead
    [why] = g.admit([a], now_ms=NOW)  # and is set right: A is inside its window, so must still be known
    assert why is not None and why.reason == "replayed"
    g.close()


def audited(trail) -> dict[str, str]:
    """request id -> reason of each record in ``trail`` (a real audit writer's directory), once it verifies."""
    assert all(r.ok for reps in audit.verify_path(trail).values() for r in reps)
    return {r["request_id"]: r["reason"] for r in audit.read_records(trail)}


def test_preprocessor_rejects_replays_and_expired_and_audits_the_reason(tmp_path, keys):
    trail = tmp_path / "audit"
    pre = Preprocessor(keys, audit.AuditWriter(trail / "preprocess_0.jsonl"), pipelines={"pipeline"},
                       replay=replay.ReplayGuard(tmp_path / "r.db"))
    img = samples.photo("coffee")
    fresh = envelope.seal(img, keys.key("k1"), key_id="k1", client_id="c", pipeline="pipeline")
    old = envelope.seal(img, keys.key("k1"), key_id="k1", client_id="c", pipeline="pipeline",
                        timestamp_ms=int(time.time() * 1000) - 301_000)
    out = pre.run([Request(fresh, "r1"), Request(fresh, "r2"), Request(old, "r3")])
    assert isinstance(out[0], Accepted)
    assert isinstance(out[1], Refusal) and out[1].reason == "replayed"
    assert isinstance(out[2], Refusal) and out[2].reason == "expired" and "replay window" in out[2].message
    assert audited(trail) == {"r2": "replayed", "r3": "expired"}
    assert isinstance(pre.run([Request(fresh, "r4")])[0], Refusal)  # and in a later batch
    assert audited(trail)["r4"] == "replayed"
    pre.audit.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_expired_and_replayed_envelopes_rejected_by_the_server(server, keys, audit_dir, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    c = PipelineClient(url, protocol=protocol, key=keys.key("k1"), key_id="k1", client_id=f"replayer-{protocol}")
    sealed = c.seal(samples.photo("coffee"))
    assert c.infer_envelope(sealed, top_k=1).predictions[0].index == 967
    stale = envelope.seal(samples.photo("coffee"), keys.key("k1"), key_id="k1", client_id=c.client_id,
                          pipeline="pipeline", timestamp_ms=int(time.time() * 1000) - 3_600_000)
    for data, fragment, reason in ((sealed, "already received (replay)", "replayed"),
                                   (stale, "outside the 300 s replay window", "expired")):
        rid = uuid.uuid4().hex
        with pytest.raises(InferenceServerException) as info:
            c.infer_envelope(data, request_id=rid)
        assert fragment in info.value.message() and str(info.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT")
        [rec] = [r for r in audit.read_records(audit_dir) if r.get("request_id") == rid]
        assert rec["event"] == "rejected" and rec["reason"] == reason
    c.close()


def test_every_repeated_identical_request_is_audited(server, keys, audit_dir):
    """The same envelope 5 times: 5 audit records (1 served, 4 replays). A response-cache hit
    would have answered the repeats as successes without reaching the stages."""
    c = PipelineClient(server.http_url, protocol="http", key=keys.key("k1"), key_id="k1", client_id="repeater")
    sealed = c.seal(samples.photo("chelsea"))
    outcomes = []
    for i in range(5):
        try:
            c.infer_envelope(sealed, request_id=f"same-{i}")
            outcomes.append("served")
        except InferenceServerException:
            outcomes.append("rejected")
    c.close()
    assert outcomes == ["served"] + ["rejected"] * 4
    recs = [r for r in audit.read_records(audit_dir) if str(r.get("request_id", "")).startswith("same-")]
    assert sorted(r["request_id"] for r in recs) == [f"same-{i}" for i in range(5)]
    assert {r["envelope_sha256"] for r in recs} == {recs[0]["envelope_sha256"]}


AUDITED = ("preprocess", "postprocess")


def test_response_cache_is_off_on_audited_models_and_ensembles():
    repo = ROOT / "model_repository"
    checked = 0
    for cfg in repo.glob("*/config.pbtxt"):
        for f in [cfg, *cfg.parent.glob("configs/*.pbtxt")]:
            text = re.sub(r"#.*", "", f.read_text())
            if cfg.parent.name in AUDITED or any(f'model_name: "{m}"' in text for m in AUDITED):
                checked += 1
                assert "response_cache" not in text, f"{f}: a cache hit would skip the audit"
    assert checked >= 3


def test_window_and_nonce_are_decided_in_one_transaction(tmp_path):
    """Issue 14 (8): one clock reading inside the write transaction decides both; no prune in between."""
    g = replay.ReplayGuard(tmp_path / "r.db", window_s=60, future_skew_s=5, prune_every_s=0)
    verdicts = g.admit([("k1", b"a" * 12, NOW), ("k1", b"b" * 12, NOW - 61_000), ("k1", b"c" * 12, NOW + 6_000),
                        ("k1", b"a" * 12, NOW)], now_ms=NOW)
    assert [v and v.reason for v in verdicts] == [None, "expired", "from_future", "replayed"]
    assert g.size() == 1  # refused envelopes leave no nonce behind
    g.close()


def test_a_locked_store_fails_fast_and_retryable(tmp_path):
    """Issue 14 (7): a store held by another writer stalled every request 30 s, then raised
    OperationalError out of the stage. Now: Unavailable after the short busy timeout, nothing recorded."""
    import sqlite3

    from rtinfer.errors import Unavailable
    g = replay.ReplayGuard(tmp_path / "r.db", busy_timeout_s=0.2)
    holder = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # e.g. a backup tool, or any sqlite3 session writing
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as info:
        g.admit([("k1", b"n" * 12, NOW)], now_ms=NOW)
    assert time.monotonic() - t0 < 2 and info.value.reason == "replay_store_unavailable"
    assert "locked" in str(info.value) and "locked" not in info.value.public  # detail for the audit only
    holder.execute("ROLLBACK")
    assert g.admit([("k1", b"n" * 12, NOW)], now_ms=NOW) == [None]  # not burned by the failed attempt
    g.release([("k1", b"n" * 12)])
    assert g.admit([("k1", b"n" * 12, NOW)], now_ms=NOW) == [None]  # released: may be sent again
    holder.close(), g.close()


def test_stage_refuses_a_whole_batch_retryably_when_the_store_is_locked(tmp_path, keys):
    import sqlite3
    trail = tmp_path / "audit"
    pre = Preprocessor(keys, audit.AuditWriter(trail / "preprocess_0.jsonl"), pipelines={"pipeline"},
                       replay=replay.ReplayGuard(tmp_path / "r.db", busy_timeout_s=0.1))
    sealed = [envelope.seal(samples.photo("coffee"), keys.key("k1"), key_id="k1", client_id="c", pipeline="pipeline")
              for _ in range(2)]
    holder = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    out = pre.run([Request(s, f"r{i}") for i, s in enumerate(sealed)] + [Request(b"garbage", "r9")])
    assert [(r.reason, r.retryable) for r in out] == [("replay_store_unavailable", True)] * 2 + [("truncated", False)]
    assert audited(trail) == {"r0": "replay_store_unavailable", "r1": "replay_store_unavailable", "r9": "truncated"}
    holder.execute("ROLLBACK")
    assert all(isinstance(r, Accepted) for r in pre.run([Request(s, f"again{i}") for i, s in enumerate(sealed)]))
    holder.close()
    pre.audit.close()
