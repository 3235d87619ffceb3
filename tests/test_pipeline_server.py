"""The encrypted pipeline on a real tritonserver, over real gRPC and HTTP sockets."""
from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, envelope
from rtinfer.server import TritonServer

from conftest import require_model

PROTOCOLS = ["grpc", "http"]
CATS = range(281, 286)


def url(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.fixture(params=PROTOCOLS)
def client(request, server, keys):
    c = PipelineClient(url(server, request.param), protocol=request.param, key=keys.key("k1"), key_id="k1",
                       client_id=f"tester-{request.param}")
    yield c
    c.close()


def records_for(audit_dir, request_id):
    return [r for r in audit.read_records(audit_dir) if r.get("request_id") == request_id]


def test_chelsea_is_a_cat_and_coffee_is_espresso(client, audit_dir):
    cat = client.classify(samples.photo("chelsea"), top_k=5)
    assert cat.predictions[0].index in CATS, cat.predictions
    coffee = client.classify(samples.photo("coffee"), top_k=5)
    assert coffee.predictions[0].index == 967 and coffee.predictions[0].label == "espresso"
    for res in (cat, coffee):
        scores = [p.score for p in res.predictions]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-6
        [rec] = records_for(audit_dir, res.request_id)
        assert rec["event"] == "served" and rec["hash"] == res.audit_ref
        assert rec["client_id"] == client.client_id and rec["key_id"] == "k1"
        assert rec["top1"]["index"] == res.predictions[0].index
        assert set(rec["timing_ms"]) >= {"preprocess", "classifier_incl_queues", "postprocess", "total"}


def test_png_and_second_key(server, keys, audit_dir):
    c = PipelineClient(server.grpc_url, key=keys.key("k2"), key_id="k2", client_id="png-user")
    res = c.classify(samples.photo("coffee", fmt="PNG"), top_k=1)
    assert res.predictions[0].index == 967
    assert records_for(audit_dir, res.request_id)[0]["key_id"] == "k2"


def test_audit_never_holds_plaintext(client, audit_dir):
    image = samples.photo("chelsea")
    res = client.classify(image, top_k=1)
    text = "\n".join(f.read_text() for f in audit.audit_files(audit_dir))
    assert res.request_id in text and image.hex()[:64] not in text


def expect_rejected(client, sealed, fragment, reason, audit_dir):
    """Rejected with INVALID_ARGUMENT / 400, a message saying what was wrong, audited, no traceback."""
    rid = uuid.uuid4().hex
    with pytest.raises(InferenceServerException) as info:
        client.infer_envelope(sealed, request_id=rid)
    msg, status = info.value.message(), str(info.value.status())
    assert fragment in msg, msg
    assert "Traceback" not in msg and ".py" not in msg
    assert "k9" not in msg and "pipeline_onnx" not in msg  # no key ids or served pipelines before authentication
    assert status in ("StatusCode.INVALID_ARGUMENT", "400"), status
    [rec] = records_for(audit_dir, rid)
    assert rec["event"] == "rejected" and rec["reason"] == reason and rec["stage"] == "preprocess"
    return rec


def tampered(sealed: bytes) -> bytes:
    b = bytearray(sealed)
    b[-30] ^= 0xFF
    return bytes(b)


BAD_ENVELOPES = {
    "tampered": (lambda c, k: tampered(c.seal(samples.photo("coffee"))), "authentication failed", "auth_failed"),
    "wrong key": (lambda c, k: envelope.seal(b"x" * 100, k.key("k2"), key_id="k1", client_id=c.client_id,
                                             pipeline="pipeline"), "authentication failed", "auth_failed"),
    "unknown key": (lambda c, k: envelope.seal(b"x", os.urandom(32), key_id="k9", client_id=c.client_id,
                                               pipeline="pipeline"), "authentication failed", "unknown_key"),
    "truncated": (lambda c, k: c.seal(samples.photo("coffee"))[:20], "envelope truncated", "truncated"),
    "wrong pipeline": (lambda c, k: envelope.seal(samples.photo("coffee"), k.key("k1"), key_id="k1",
                                                  client_id=c.client_id, pipeline="other_service"),
                       "authentication failed", "wrong_pipeline"),
    "wrong client": (lambda c, k: envelope.seal(samples.photo("coffee"), k.key("k1"), key_id="k1",
                                                client_id="somebody-else", pipeline="pipeline"),
                     "does not match the envelope's sealed client id", "client_mismatch"),
    "corrupt image": (lambda c, k: c.seal(samples.photo("coffee")[:3000]), "could not be decoded", "bad_image"),
    "not an image": (lambda c, k: c.seal(b"GIF89a definitely not a photo"), "not a JPEG or PNG", "bad_image"),
    "decompression bomb": (lambda c, k: c.seal(__import__("test_imaging")._png_header_only(60_000, 60_000)),
                           "more than the limit", "too_many_pixels"),
    "oversized": (lambda c, k: c.seal(b"\0" * (8 * 1024 * 1024 + 1)), "more than the limit of 8388608",
                  "too_large"),
}


@pytest.mark.parametrize("case", list(BAD_ENVELOPES))
def test_bad_envelope_rejected_audited_and_server_keeps_serving(case, client, keys, audit_dir):
    make, fragment, reason = BAD_ENVELOPES[case]
    expect_rejected(client, make(client, keys), fragment, reason, audit_dir)
    assert client.classify(samples.photo("coffee"), top_k=1).predictions[0].index == 967


def test_envelope_sealed_for_another_pipeline_is_not_audited_as_that_pipeline(client, keys, audit_dir):
    """Issue 20 (2): sealed for pipeline_int8 and sent to `pipeline`, it was served by pipeline's classifier
    and audited as pipeline_int8, naming classifier_trt_int8, which did not answer. Each ensemble's
    preprocess now accepts only its own audience: refused, audited as what it was sent to."""
    sealed = envelope.seal(samples.photo("coffee"), keys.key("k1"), key_id="k1", client_id=client.client_id,
                           pipeline="pipeline_int8")
    rec = expect_rejected(client, sealed, "authentication failed", "wrong_pipeline", audit_dir)
    assert rec["pipeline"] == "pipeline" and rec["claimed_pipeline"] == "pipeline_int8"
    assert "sealed for pipeline 'pipeline_int8'" in rec["message"]
    same = [r for r in audit.read_records(audit_dir) if r.get("envelope_sha256") == rec["envelope_sha256"]]
    assert same == [rec]  # nothing served, nothing recorded as pipeline_int8
    assert client.classify(samples.photo("coffee"), top_k=1).predictions[0].index == 967


def test_each_ensemble_serves_and_audits_only_its_own_audience(keyring_path, keys, signing_key, tmp_path):
    """Issue 20 (2), with an A/B arm loaded beside `pipeline` (its own preprocess_onnx, the same code):
    each serves the envelopes sealed for it, audited under its own name and classifier, and refuses
    the other's."""
    require_model()
    audit_dir = tmp_path / "audit"
    with TritonServer(keyring=str(keyring_path), audit_dir=str(audit_dir), audit_signing_key=str(signing_key[0]),
                      models=("pipeline", "pipeline_onnx"), workdir=tmp_path / "triton") as srv:
        for served, other in (("pipeline_onnx", "pipeline"), ("pipeline", "pipeline_onnx")):
            c = PipelineClient(srv.grpc_url, key=keys.key("k1"), key_id="k1", client_id="ab-user", pipeline=served)
            res = c.classify(samples.photo("coffee"), top_k=1)
            assert res.predictions[0].index == 967
            [rec] = records_for(audit_dir, res.request_id)
            assert rec["event"] == "served" and rec["pipeline"] == served
            assert rec["models"]["classifier"].startswith("classifier_onnx/"), rec["models"]
            misdirected = envelope.seal(samples.photo("coffee"), keys.key("k1"), key_id="k1", client_id="ab-user",
                                        pipeline=other)
            rid = uuid.uuid4().hex
            with pytest.raises(InferenceServerException):
                c.infer_envelope(misdirected, request_id=rid)
            [rec] = records_for(audit_dir, rid)
            assert (rec["event"], rec["reason"], rec["pipeline"], rec["claimed_pipeline"]) == \
                ("rejected", "wrong_pipeline", served, other)
            c.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_dtype_and_shape_rejected_by_triton(server, protocol):
    mod = grpcclient if protocol == "grpc" else httpclient
    c = mod.InferenceServerClient(url(server, protocol))
    bad_dtype = mod.InferInput("ENVELOPE", [1, 1], "FP32")
    bad_dtype.set_data_from_numpy(np.zeros((1, 1), np.float32))
    bad_shape = mod.InferInput("ENVELOPE", [1, 3], "BYTES")
    bad_shape.set_data_from_numpy(np.array([[b"a", b"b", b"c"]], dtype=np.object_))
    for inp, fragment in ((bad_dtype, "data-type"), (bad_shape, "shape")):
        with pytest.raises(InferenceServerException) as info:
            c.infer("pipeline", [inp])
        assert fragment in info.value.message().lower() or fragment.replace("-", " ") in info.value.message().lower()
    assert c.is_model_ready("pipeline")
    c.close()


def batch_stats(server, model):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    stats = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
    c.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def send_mixed(make_client, id_prefix: str, n: int = 24) -> list:
    """``n`` concurrent requests, chelsea and coffee alternating, every third tampered (its refusal checked);
    per request the result. ``make_client()`` makes an aio PipelineClient (they bind to the running loop)."""
    images = [samples.photo("chelsea"), samples.photo("coffee")]

    async def run():
        client = make_client()

        async def one(i):
            sealed = client.seal(images[i % 2])
            kwargs = client.request(tampered(sealed) if i % 3 == 0 else sealed, 1, f"{id_prefix}-{i}")
            try:
                return client.result(kwargs, await client.client.infer(**kwargs))
            except InferenceServerException as exc:
                return exc
        try:
            return await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await client.close()

    results = asyncio.run(run())
    for i, res in enumerate(results):
        if i % 3 == 0:
            assert isinstance(res, InferenceServerException) and "authentication failed" in res.message()
        else:
            assert not isinstance(res, Exception), res
    return results


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mixed_batch_good_requests_succeed(server, keys, audit_dir, protocol):
    """Concurrent requests, every third one tampered: dynamic batching groups them, only bad ones fail."""
    before = batch_stats(server, "preprocess")
    results = send_mixed(lambda: PipelineClient(url(server, protocol), protocol=protocol, aio=True,
                                                key=keys.key("k1"), key_id="k1", client_id="batcher"),
                         f"mix-{protocol}")
    for i, res in enumerate(results):
        if i % 3:
            assert res.predictions[0].index == (967 if i % 2 else 285) or res.predictions[0].index in CATS
    after = batch_stats(server, "preprocess")
    grouped = sum(after.get(b, 0) - before.get(b, 0) for b in after if b > 1)
    assert grouped > 0, f"no preprocess execution batched more than one request: {before} -> {after}"
    for i in range(24):
        [rec] = records_for(audit_dir, f"mix-{protocol}-{i}")
        assert rec["event"] == ("rejected" if i % 3 == 0 else "served")


def test_audit_trail_verifies_after_all_requests(server, audit_dir):
    for f in audit.audit_files(audit_dir):
        rep = audit.verify_file(f)
        assert rep.ok, (f, rep)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_several_envelopes_in_one_request_refused(server, keys, audit_dir, protocol):
    """A client-side batch would get one response for several envelopes: refused clearly, audited."""
    client = PipelineClient(url(server, protocol), protocol=protocol, key=keys.key("k1"), key_id="k1",
                            client_id="batch-sender")
    kwargs = client.request(client.seal(samples.photo("coffee")), 1, uuid.uuid4().hex)
    two = [client.seal(samples.photo("coffee")), client.seal(samples.photo("chelsea"))]
    kwargs["inputs"][0] = client._m.InferInput("ENVELOPE", [2, 1], "BYTES")
    kwargs["inputs"][0].set_data_from_numpy(np.array(two, dtype=np.object_).reshape(2, 1))
    with pytest.raises(InferenceServerException) as info:
        client.client.infer(**kwargs)
    assert "one envelope per request, got 2" in info.value.message()
    [rec] = records_for(audit_dir, kwargs["request_id"])
    assert rec["reason"] == "batched_request"
    client.close()
