"""rtinfer.cascade without Triton: routes, fallbacks and failures per row, with real envelopes, keys and
audit files, and edge/cloud functions whose answers the test controls (the server tests use the real models)."""
import os

import numpy as np

from clients import samples
from rtinfer import audit, envelope, routing
from rtinfer.cascade import Cascade, CloudAnswer, CloudMiss
from rtinfer.errors import Refusal
from rtinfer.keyring import Keyring
from rtinfer.postprocess import Postprocessor
from rtinfer.preprocess import Preprocessor, Request

KEY = os.urandom(32)
LABELS = tuple(f"c{i}" for i in range(1000))


def make(tmp_path, threshold=0.5):
    writer = audit.AuditWriter(tmp_path / "cascade_0_0.jsonl")
    ctx_key = os.urandom(32)
    pre = Preprocessor(Keyring({"k1": KEY}), writer, pipelines={"cascade"}, keep_plaintext=True, stage="cascade",
                       ctx_key=ctx_key)
    post = Postprocessor(writer, LABELS, models={}, internal_keys=None, stage="cascade")
    return Cascade(pre, post, routing.Policy("top1", threshold), edge_model="edge/1@aa", cloud_model="big/1@bb"), writer


def logits_with_top(p: float, index: int) -> np.ndarray:
    """Logits whose softmax has probability ``p`` on ``index`` and the rest spread evenly."""
    q = (1 - p) / 999
    out = np.full(1000, np.log(q), np.float32)
    out[index] = np.log(p)
    return out


def requests(n, tamper=()):
    out = []
    for i in range(n):
        sealed = envelope.seal(samples.photo("coffee"), KEY, key_id="k1", client_id="c", pipeline="cascade")
        if i in tamper:
            sealed = sealed[:-1] + bytes([sealed[-1] ^ 1])
        out.append(Request(sealed, f"r{i}", "c"))
    return out


def test_routes_per_row_and_the_cloud_answer_replaces_the_edge_one(tmp_path):
    cascade, writer = make(tmp_path)
    edge = lambda x: np.stack([logits_with_top(0.9, 1), logits_with_top(0.2, 2), logits_with_top(0.3, 3),
                               logits_with_top(0.25, 5)])
    asked = []

    def cloud(rows):
        asked.extend(rows)
        return [CloudAnswer(np.eye(1000)[7] * 0.8 + 0.2 / 1000, "big/1@bb", 5.0), CloudMiss("breaker open"), None]
    out = cascade.run(requests(4), [{}] * 4, edge, cloud)
    writer.close()
    assert len(asked) == 3 and all(r.plaintext == samples.photo("coffee") for r in asked)
    assert [int(np.argmax(o[0])) for o in out] == [1, 7, 3, 5]
    recs = {r["request_id"]: r for r in audit.read_records(tmp_path)}
    assert [recs[f"r{i}"]["route"] for i in range(4)] == ["edge", "cloud", "edge_fallback", "edge_fallback"]
    assert recs["r1"]["models"]["classifier"] == "big/1@bb" and recs["r2"]["models"]["classifier"] == "edge/1@aa"
    assert recs["r2"]["cloud_error"] == "breaker open"  # why the cloud did not answer, when the cloud says
    assert all("cloud_error" not in recs[f"r{i}"] for i in (0, 1, 3))
    assert abs(recs["r0"]["confidence"] - 0.9) < 1e-5 and recs["r0"]["stage"] == "cascade"
    assert all(recs[f"r{i}"]["models"]["edge"] == "edge/1@aa" for i in range(4))


def test_a_failing_cloud_falls_back_and_a_failing_edge_is_refused_retryable_audited(tmp_path):
    cascade, writer = make(tmp_path, threshold=1.01)  # every row escalates

    def broken_cloud(rows):
        raise ConnectionError("cloud gone")
    out = cascade.run(requests(2), [{}] * 2, lambda x: np.stack([logits_with_top(0.9, 4)] * 2), broken_cloud)
    assert [int(np.argmax(o[0])) for o in out] == [4, 4]

    def broken_edge(x):
        raise RuntimeError("edge model unloaded")
    out = cascade.run(requests(3, tamper={1}), [{}] * 3, broken_edge, broken_cloud)
    writer.close()
    assert isinstance(out[0], Refusal) and out[0].retryable and out[0].reason == "edge_unavailable"
    assert isinstance(out[1], Refusal) and not out[1].retryable  # the tampered one: the client's mistake
    recs = [r for r in audit.read_records(tmp_path) if r.get("event") in ("served", "rejected")]
    assert [r["route"] for r in recs[:2]] == ["edge_fallback", "edge_fallback"]
    reasons = sorted(r["reason"] for r in recs[2:])
    assert reasons == ["auth_failed", "edge_unavailable", "edge_unavailable"], reasons
