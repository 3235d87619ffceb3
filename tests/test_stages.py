"""Stage logic driven directly (no server): one bad row fails alone and is audited."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from rtinfer import audit, envelope, keyring, stage_config
from rtinfer.cascade import Cascade
from rtinfer.errors import Refusal
from rtinfer.keyring import Keyring
from rtinfer.postprocess import Postprocessor, Rows, read_request
from rtinfer.preprocess import Accepted, Preprocessor, Request

from helpers import palette_png_trns_no_plte

KEY = os.urandom(32)


def context(request_id, key_id="k1", sealed=False):
    return json.dumps({"request_id": request_id, "client_id": "c", "key_id": key_id, "pipeline": "pipeline",
                       "envelope_sha256": "00" * 32, "sealed_at_ms": 0, "preprocess_version": "1",
                       "seal_response": sealed, "t_start_ns": 0, "t_pre_done_ns": 1}).encode()


def test_postprocess_seal_key_gone_fails_that_row_only(tmp_path):
    """A key retired between preprocess and postprocess: that request is refused and audited, not the batch."""
    writer = audit.AuditWriter(tmp_path / "post.jsonl")
    post = Postprocessor(writer, tuple(f"c{i}" for i in range(1000)), models={}, keyring=Keyring({"k1": KEY}))
    logits = np.random.default_rng(0).normal(size=(3, 1000)).astype(np.float32)
    probs, refs = post.run(logits, [context("a", sealed=True), context("b", key_id="gone", sealed=True),
                                    context("c")], ["a", "b", "c"])
    assert isinstance(refs[0], bytes) and isinstance(refs[2], str)
    assert isinstance(refs[1], Refusal) and refs[1].reason == "unknown_key" and "gone" not in refs[1].public
    writer.close()
    recs = {r["request_id"]: r for r in audit.read_records(tmp_path)}
    assert recs["a"]["event"] == recs["c"]["event"] == "served"
    assert recs["b"]["event"] == "rejected" and recs["b"]["reason"] == "unknown_key"
    assert audit.verify_file(tmp_path / "post.jsonl").ok


def test_preprocess_refuses_several_envelopes_in_one_request(tmp_path):
    writer = audit.AuditWriter(tmp_path / "pre.jsonl")
    pre = Preprocessor(Keyring({"k1": KEY}), writer, pipelines={"pipeline"})
    sealed = envelope.seal(b"x", KEY, key_id="k1", client_id="c", pipeline="pipeline")
    [result] = pre.run([Request(sealed, request_id="r", count=2)])
    assert isinstance(result, Refusal) and result.reason == "batched_request"
    assert "one envelope per request, got 2" in result.message
    writer.close()
    [rec] = audit.read_records(tmp_path)
    assert rec["request_id"] == "r" and rec["reason"] == "batched_request"


def test_classifier_ids_name_the_file_each_host_loads(tmp_path):
    """The audit's classifier id is the hash of the file that answered, from the model's manifest."""
    from rtinfer.stage_config import classifier_ids
    d = tmp_path / "classifier_onnx" / "1"
    d.mkdir(parents=True)
    d.joinpath("manifest.json").write_text(json.dumps(
        {"artifact": "model.onnx", "sha256": "a" * 64, "portable": {"artifact": "model.portable.onnx",
                                                                   "sha256": "b" * 64}}))
    ids = classifier_ids("pipeline=classifier_onnx,pipeline_onnx=classifier_onnx/model.portable.onnx,"
                         "x=classifier_onnx/missing.onnx,y=classifier_trt_fp16", tmp_path)
    assert ids == {"pipeline": "classifier_onnx/1@" + "a" * 16,
                   "pipeline_onnx": "classifier_onnx/1:model.portable.onnx@" + "b" * 16,
                   "x": "classifier_onnx/1:missing.onnx@not-in-manifest",
                   "y": "classifier_trt_fp16/1@no-manifest"}


class FailingAudit:
    """An audit whose disk is full."""

    def __init__(self):
        self.calls = 0

    def append(self, records):
        self.calls += 1
        if records:
            raise OSError(27, "File too large")
        return []


def test_any_exception_of_one_request_fails_it_alone(tmp_path, monkeypatch):
    """Whatever a step raises for one request (here: the decoder raising something unexpected, a header
    whose ts overflows a float), that request alone is refused, audited, with no exception text."""
    from rtinfer import imaging, replay
    real = imaging.preprocess

    def decoder(data, **kw):
        if data == b"boom":
            raise ZeroDivisionError("secret /srv/path detail")
        return real(data, **kw)
    monkeypatch.setattr(imaging, "preprocess", decoder)
    writer = audit.AuditWriter(tmp_path / "pre.jsonl")
    pre = Preprocessor(Keyring({"k1": KEY}), writer, pipelines={"pipeline"},
                       replay=replay.ReplayGuard(tmp_path / "r.db"))
    from clients import samples
    good = [envelope.seal(samples.photo("coffee"), KEY, key_id="k1", client_id="c", pipeline="pipeline")
            for _ in range(3)]
    bad = [envelope.seal(b"boom", KEY, key_id="k1", client_id="c", pipeline="pipeline"),
           envelope.seal(palette_png_trns_no_plte(), KEY, key_id="k1", client_id="c", pipeline="pipeline"),
           envelope.seal(b"x", KEY, key_id="k1", client_id="c", pipeline="pipeline",
                         timestamp_ms=int("1" + "0" * 400))]
    out = pre.run([Request(e, f"g{i}") for i, e in enumerate(good)] + [Request(e, f"b{i}") for i, e in enumerate(bad)])
    assert all(isinstance(r, Accepted) for r in out[:3])
    assert all(isinstance(r, Refusal) and not r.retryable for r in out[3:])
    assert out[3].reason == "bad_input" and "secret" not in out[3].public and "ZeroDivision" not in out[3].public
    assert out[5].reason == "bad_format"
    writer.close()
    recs = {r["request_id"]: r for r in audit.read_records(tmp_path)}
    assert set(recs) == {"b0", "b1", "b2"} and "ZeroDivisionError" in recs["b0"]["message"]


def test_audit_failure_refuses_retryably_and_releases_nonces(tmp_path):
    """Nothing is answered unaudited; the envelopes the server failed can be sent again."""
    from rtinfer import replay
    guard_ = replay.ReplayGuard(tmp_path / "r.db")
    pre = Preprocessor(Keyring({"k1": KEY}), FailingAudit(), pipelines={"pipeline"}, replay=guard_)
    bad_image = envelope.seal(b"not an image", KEY, key_id="k1", client_id="c", pipeline="pipeline")
    [r] = pre.run([Request(bad_image, "r1")])
    assert r.retryable and r.reason == "audit_unavailable" and "File too large" not in r.public
    assert guard_.size() == 0  # released: the same envelope may come again


def test_postprocess_bad_context_and_logits_fail_their_rows_alone(tmp_path):
    """A context that is not JSON failed the batch with INTERNAL and an exception name (issue 10)."""
    writer = audit.AuditWriter(tmp_path / "post.jsonl")
    post = Postprocessor(writer, tuple(f"c{i}" for i in range(1000)), models={})
    logits = np.random.default_rng(0).normal(size=(4, 1000)).astype(np.float32)
    logits[3, 7] = np.nan
    probs, refs = post.run(logits, [context("a"), b"{not json", b'{"client_id": 5}', context("d")],
                           ["a", "b", "c", "d"])
    assert isinstance(refs[0], str)
    assert [(r.reason, r.retryable) for r in refs[1:]] == [("bad_context", False)] * 2 + [("bad_logits", False)]
    writer.close()
    recs = {r["request_id"]: r for r in audit.read_records(tmp_path)}
    assert recs["a"]["event"] == "served" and all(recs[k]["event"] == "rejected" for k in "bcd")
    post = Postprocessor(FailingAudit(), tuple(f"c{i}" for i in range(1000)), models={})
    probs, refs = post.run(logits[:1], [context("a")], ["a"])
    assert refs[0].retryable and refs[0].reason == "audit_unavailable" and not probs.any()


def test_sealed_result_stays_out_of_the_audit(tmp_path):
    """Issue 14 (4): the audit held top-1 label and score in clear even for sealed responses."""
    from rtinfer import audit_context, internal_key
    from rtinfer.postprocess import result_mac
    keys = internal_key.InternalKeys(tmp_path / "internal.key")
    writer = audit.AuditWriter(tmp_path / "post.jsonl")
    post = Postprocessor(writer, tuple(f"c{i}" for i in range(1000)), models={}, keyring=Keyring({"k1": KEY}),
                         internal_keys=keys)
    logits = np.zeros((2, 1000), np.float32)
    logits[:, 42] = 9
    contexts = [audit_context.seal(json.loads(c), keys.current) for c in (context("s", sealed=True), context("p"))]
    _, refs = post.run(logits, contexts, ["s", "p"], [{}, {"seal_response": "1"}])
    assert isinstance(refs[0], bytes) and isinstance(refs[1], str)  # the header decides, not the parameter
    writer.close()
    recs = {r["request_id"]: r for r in audit.read_records(tmp_path)}
    # the label as a JSON string value (a bare "c42" can occur inside the record's hex hashes and MACs)
    assert "top1" not in recs["s"] and '"c42"' not in json.dumps(recs["s"])
    assert recs["s"]["top1_mac"] == result_mac(keys.current, "00" * 32, 42)
    assert recs["s"]["mac_key"] == internal_key.fingerprint(keys.current)
    assert recs["p"]["top1"]["index"] == 42


def test_postprocess_refuses_unauthenticated_stale_replayed_or_misdirected_contexts(tmp_path):
    """Issue 10 (1): AUDIT_CTX is MAC'd by preprocess under the server-internal key and bound to the
    request id and its time; postprocess refuses per request what does not check, audited, and uses
    a context once. The good rows of the same batch are served."""
    import time as _time

    from rtinfer import audit_context, internal_key, replay
    keys = internal_key.InternalKeys(tmp_path / "internal.key", check_s=0)
    key = keys.current
    writer = audit.AuditWriter(tmp_path / "post.jsonl")
    post = Postprocessor(writer, tuple(f"c{i}" for i in range(1000)), models={}, internal_keys=keys,
                         ctx_store=replay.ReplayGuard(tmp_path / "ctx.db", window_s=60, future_skew_s=5))
    now = _time.time_ns()

    def ctx(rid, client="alice", age_s=0.0, mac_key=key):
        body = json.loads(context(rid))
        body.update(client_id=client, t_start_ns=int(now - age_s * 1e9) - 1000, t_pre_done_ns=int(now - age_s * 1e9))
        return audit_context.seal(body, mac_key)
    genuine = ctx("good")
    forged = ctx("forged", client="victim", mac_key=os.urandom(32))
    unmacd = json.dumps({**json.loads(ctx("plain")), "mac": "00" * 32}).encode()
    rows = [(genuine, "good"), (forged, "forged"), (unmacd, "plain"), (ctx("stale", age_s=120), "stale"),
            (ctx("other"), "not-other"), (b"\xff garbage", "garbage"), (ctx("good2"), "good2")]
    logits = np.zeros((len(rows), 1000), np.float32)
    _, refs = post.run(logits, [r[0] for r in rows], [r[1] for r in rows])
    reasons = [r if isinstance(r, str) else r.reason for r in refs]
    assert isinstance(refs[0], str) and isinstance(refs[6], str)
    assert reasons[1:6] == ["context_forged", "context_forged", "context_expired", "context_request_id",
                            "bad_context"]
    assert all(not r.retryable for r in refs[1:6])
    _, again = post.run(logits[:1], [genuine], ["good"])  # the same genuine context a second time
    assert again[0].reason == "context_replayed"
    internal_key.rotate(tmp_path / "internal.key")  # rotated: a context made just before still checks ...
    _, after = post.run(logits[:2], [ctx("before-rotation"), ctx("new", mac_key=keys.all()[0])],
                        ["before-rotation", "new"])
    assert keys.current != key and all(isinstance(r, str) for r in after), after
    internal_key.rotate(tmp_path / "internal.key")  # ... but not after the next rotation
    _, old = post.run(logits[:1], [ctx("too-old-key")], ["too-old-key"])
    assert old[0].reason == "context_forged"
    writer.close()
    recs = audit.read_records(tmp_path)
    assert [r["request_id"] for r in recs if r["event"] == "served"] == ["good", "good2", "before-rotation", "new"]
    assert all(r.get("client_id") != "victim" for r in recs)  # a forged context's claims stay out


def test_crop_policy_is_chosen_per_pipeline(tmp_path):
    """`crop_by_pipeline`: the envelope's sealed audience picks the crop (centre by default)."""
    import io

    from PIL import Image
    arr = np.zeros((256, 768, 3), np.uint8)
    arr[:, :256] = (255, 0, 0)   # a red left third: cut away by the centre crop, kept by the squash
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    writer = audit.AuditWriter(tmp_path / "pre.jsonl")
    pre = Preprocessor(Keyring({"k1": KEY}), writer, pipelines={"pipeline", "pipeline_onnx"},
                       crop_by_pipeline={"pipeline_onnx": "squash"})
    out = pre.run([Request(envelope.seal(buf.getvalue(), KEY, key_id="k1", client_id="c", pipeline=p), p)
                   for p in ("pipeline", "pipeline_onnx")])
    writer.close()
    centre, squash = (r.image for r in out)
    assert centre.shape == squash.shape == (224, 224, 3) and centre.dtype == np.uint8
    assert centre[:, :, 0].max() == 0 and squash[:, :60, 0].min() > 200


def test_a_context_signed_with_a_key_the_checker_has_not_reloaded_yet_is_served(tmp_path):
    """Issue 20 (1): preprocess and postprocess reload the internal key file on their own schedules. Rotated,
    preprocess MACs with the new key before postprocess has read it: good requests were refused as forged
    (not retryable, audited as forgeries). Now the checker reads the file again before it calls a MAC forged;
    a context MAC'd under a key the file never held is still refused."""
    from clients import samples
    from rtinfer import audit_context, internal_key, replay
    path = tmp_path / "internal.key"
    signer = internal_key.InternalKeys(path, check_s=0)  # preprocess: sees the rotation at once
    checker = internal_key.InternalKeys(path, check_s=3600)  # postprocess: has not looked at the file since
    internal_key.rotate(path)
    pre_log, post_log = audit.AuditWriter(tmp_path / "pre.jsonl"), audit.AuditWriter(tmp_path / "post.jsonl")
    pre = Preprocessor(Keyring({"k1": KEY}), pre_log, pipelines={"pipeline"},
                       replay=replay.ReplayGuard(tmp_path / "nonces.db"), ctx_key=signer)
    post = Postprocessor(post_log, tuple(f"c{i}" for i in range(1000)), models={}, internal_keys=checker,
                         ctx_store=replay.ReplayGuard(tmp_path / "ctx.db", window_s=60, future_skew_s=5))
    sealed = envelope.seal(samples.photo("coffee"), KEY, key_id="k1", client_id="alice", pipeline="pipeline")
    [accepted] = pre.run([Request(sealed, "good")])
    assert isinstance(accepted, Accepted) and signer.current not in checker.all()  # the window, reproduced
    body = {k: v for k, v in json.loads(accepted.context).items() if k != "mac"}
    forged = audit_context.seal({**body, "request_id": "forged", "client_id": "victim"}, os.urandom(32))
    _, refs = post.run(np.zeros((2, 1000), np.float32), [accepted.context, forged], ["good", "forged"])
    assert isinstance(refs[0], str), refs[0]
    assert isinstance(refs[1], Refusal) and refs[1].reason == "context_forged" and not refs[1].retryable
    pre_log.close(), post_log.close()
    recs = {r["request_id"]: r for r in audit.read_records(tmp_path) if r["stage"] == "postprocess"}
    assert recs["good"]["event"] == "served" and recs["good"]["client_id"] == "alice"
    assert recs["forged"]["event"] == "rejected" and recs["forged"]["reason"] == "context_forged"


class _Tensor:
    def __init__(self, array):
        self.array = array

    def as_numpy(self):
        return self.array


class _Request:
    """What postprocess.read_request reads of a Triton request."""

    def __init__(self, request_id, tensors, parameters="{}"):
        self.id, self.tensors, self.params = request_id, tensors, parameters

    def request_id(self):
        return self.id

    def parameters(self):
        return self.params


class _PbUtils:
    @staticmethod
    def get_input_tensor_by_name(request, name):
        return _Tensor(request.tensors[name]) if name in request.tensors else None


def test_postprocess_reads_each_request_and_answers_each_alone(tmp_path):
    """rtinfer.postprocess.read_request and Postprocessor.run_requests (what the adapter calls): rows of a
    request that cannot be read, or one of whose rows is refused, fail that request only."""
    writer = audit.AuditWriter(tmp_path / "post.jsonl")
    post = Postprocessor(writer, tuple(f"c{i}" for i in range(10)), models={})
    assert post.classes == 10
    rng = np.random.default_rng(0)
    ctx = lambda rid: np.array([[context(rid)]], dtype=np.object_)
    requests = [
        _Request("a", {"LOGITS": rng.normal(size=(1, 10)).astype(np.float32), "AUDIT_CTX": ctx("a")}),
        _Request("b", {"LOGITS": np.zeros((1, 7), np.float32), "AUDIT_CTX": ctx("b")}),  # wrong width
        _Request("c", {"AUDIT_CTX": ctx("c")}),  # no LOGITS
        _Request("d", {"LOGITS": rng.normal(size=(2, 10)).astype(np.float32),
                       "AUDIT_CTX": np.array([[context("d")], [b"not json"]], dtype=np.object_)}),
        _Request("e", {"LOGITS": rng.normal(size=(1, 10)).astype(np.float32), "AUDIT_CTX": ctx("e")}, "{bad"),
    ]
    rows = [read_request(_PbUtils, r, post.classes) for r in requests]
    assert all(isinstance(r, Rows) for r in rows) and rows[0].request_id == "a" and len(rows[3].contexts) == 2
    for i in (1, 2, 4):
        assert isinstance(rows[i].contexts[0], Refusal) and rows[i].contexts[0].reason == "bad_input"
        assert rows[i].logits.shape == (1, 10)
    out = post.run_requests(rows)
    assert len(out) == 5
    probs, refs = out[0]
    assert probs.shape == (1, 10) and abs(float(probs.sum()) - 1) < 1e-5 and isinstance(refs[0], str)
    assert all(isinstance(out[i], Refusal) for i in (1, 2, 3, 4))
    assert post.run_requests([]) == []
    writer.close()
    events = sorted((r["request_id"], r["event"]) for r in audit.read_records(tmp_path))
    assert events == [("a", "served"), ("b", "rejected"), ("c", "rejected"), ("d", "rejected"), ("d", "served"),
                      ("e", "rejected")]


def _stage_config(name: str, tmp_path, monkeypatch, **extra):
    """A StageConfig as Triton hands one to the model (this repository's config of ``name``, its parameters)."""
    repo = Path(__file__).resolve().parents[1] / "model_repository"
    monkeypatch.setenv(keyring.ENV_VAR, str(keyring.write_new(tmp_path / "keys" / "keyring.json")))
    monkeypatch.setenv(audit.ENV_DIR, str(tmp_path / "audit"))
    text = (repo / name / "config.pbtxt").read_text()
    params = {k: {"string_value": v} for k, v in
              re.findall(r'\{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}', text)}
    config = {"name": name, "parameters": params, **extra}
    return stage_config.StageConfig({"model_config": json.dumps(config), "model_instance_name": f"{name}_0_0",
                                     "model_repository": str(repo / name), "model_version": "3"})


def test_stage_config_builds_each_adapters_stages(tmp_path, monkeypatch):
    """The factories the three adapters call: preprocess and postprocess each with their own audit chain; the
    cascade's postprocessor shares its preprocessor's chain, keyring and internal keys."""
    pre = _stage_config("preprocess", tmp_path, monkeypatch).preprocessor()
    assert pre.pipelines == {"pipeline"} and pre.stage == "preprocess" and pre.version == "3"
    assert not pre.keep_plaintext
    probs = {"output": [{"name": "PROBS", "data_type": "TYPE_FP32", "dims": [1000]}]}
    post = _stage_config("postprocess", tmp_path, monkeypatch, **probs).postprocessor()
    assert post.classes == 1000 and post.stage == "postprocess" and post.audit.path != pre.audit.path
    assert post.models.get("pipeline", "").startswith("classifier_")
    cfg = _stage_config("cascade", tmp_path, monkeypatch)
    cpre = cfg.preprocessor(stage="cascade", keep_plaintext=True)
    cpost = cfg.postprocessor(stage="cascade", sharing=cpre)
    assert cpre.pipelines == {"cascade"} and cpre.keep_plaintext
    assert cpost.audit is cpre.audit and cpost.keys is cpre.keys and cpost.internal_keys is cpre.ctx_key
    assert cfg.cloud_leg() is None  # no cloud_url: the big model in this server
    models = cfg.cascade_models()
    casc = cfg.cascade(cpre, cpost)
    assert isinstance(casc, Cascade) and casc.edge_model.startswith(models.edge + "/1")
    assert casc.cloud_model.startswith(models.big + "/1") and models.served(remote=True) == models.edge_spec
    bad = _stage_config("postprocess", tmp_path, monkeypatch,
                        output=[{"name": "PROBS", "data_type": "TYPE_FP32", "dims": [10]}])
    with pytest.raises(ValueError, match="10 classes"):
        bad.postprocessor()
    for stage in (pre, post, cpre):
        stage.audit.close()
    for store in (pre.replay, post.ctx_store, cpre.replay, cpost.ctx_store):
        store.close()
