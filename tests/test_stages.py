"""Stage logic driven directly (no server): one bad row fails alone and is audited."""
import json
import os

import numpy as np

from rtinfer import audit, envelope
from rtinfer.keyring import Keyring
from rtinfer.postprocess import Postprocessor
from rtinfer.guard import Refusal
from rtinfer.preprocess import Accepted, Preprocessor, Rejected, Request

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
    assert isinstance(result, Rejected) and result.reason == "batched_request"
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
