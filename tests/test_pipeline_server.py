"""The encrypted pipeline on a real tritonserver, over real gRPC and HTTP sockets."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from clients.evaluate import reference
from rtinfer import audit, envelope, labels
from rtinfer.launch.server import TritonServer

from conftest import REPO, require_model
from helpers import (  # noqa: F401
    BAD_ENVELOPES,
    CATS,
    batch_stats,
    expect_rejected,
    records_for,
    send_mixed,
    signed_trail,  # (BAD_ENVELOPES ... tampered: re-exported, other modules import them here)
    tampered,
)

PROTOCOLS = ["grpc", "http"]


def url(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.fixture(params=PROTOCOLS)
def client(request, server, keys):
    c = PipelineClient(url(server, request.param), protocol=request.param, key=keys.key("k1"), key_id="k1",
                       client_id=f"tester-{request.param}")
    yield c
    c.close()


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


def test_labels_are_the_standard_imagenet_names(client, audit_dir):
    """The label file (Triton's classification extension), a sealed answer (postprocess's strings) and the
    audit record all name classes as every ImageNet tool does: chelsea is a "tabby" or a "tiger cat"."""
    photo = samples.photo("chelsea")
    clear = client.classify(photo, top_k=5)
    sealed = client.infer_envelope(client.seal(photo, seal_response=True), top_k=5)
    for res in (clear, sealed):
        assert [p.label for p in res.predictions] == [labels.names()[p.index] for p in res.predictions]
        assert res.predictions[0].label in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    [rec] = records_for(audit_dir, clear.request_id)
    assert rec["top1"]["label"] == clear.predictions[0].label


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


MIXED = ("chelsea", "coffee", "astronaut", "rocket")  # four photos with four different answers


@pytest.fixture(scope="module")
def offline_top1(tmp_path_factory) -> dict[str, int]:
    """Each mixed photo's top-1 from the served classifier file, offline (ONNX Runtime, the same crop)."""
    d = tmp_path_factory.mktemp("mixed-photos")
    files = []
    for name in MIXED:
        files.append(d / f"{name}.jpg")
        files[-1].write_bytes(samples.photo(name))
    logits = reference(REPO / "classifier_onnx" / "1" / "model.onnx", files)
    return {name: int(row.argmax()) for name, row in zip(MIXED, logits)}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mixed_batch_good_requests_succeed(server, keys, audit_dir, protocol, offline_top1):
    """Concurrent requests, every third one tampered: dynamic batching groups them, only bad ones fail,
    and each good one gets its own photo's answer (an answer handed to another row of the batch fails)."""
    assert offline_top1["coffee"] == 967 and offline_top1["chelsea"] in CATS, offline_top1
    assert len(set(offline_top1.values())) == len(MIXED), f"the photos must differ in their answers: {offline_top1}"
    before = batch_stats(server, "preprocess")
    results = send_mixed(lambda: PipelineClient(url(server, protocol), protocol=protocol, aio=True,
                                                key=keys.key("k1"), key_id="k1", client_id="batcher"),
                         f"mix-{protocol}", photos=MIXED)
    after = batch_stats(server, "preprocess")
    grouped = sum(after.get(b, 0) - before.get(b, 0) for b in after if b > 1)
    assert grouped > 0, f"no preprocess execution batched more than one request: {before} -> {after}"
    for i, res in enumerate(results):
        [rec] = records_for(audit_dir, f"mix-{protocol}-{i}")
        if i % 3 == 0:
            assert rec["event"] == "rejected"
            continue
        photo = MIXED[i % len(MIXED)]
        got = res.predictions[0].index
        assert got == offline_top1[photo], f"request {i} sent {photo}, got class {got}: {offline_top1}"
        assert rec["event"] == "served" and rec["top1"]["index"] == got and rec["hash"] == res.audit_ref, (i, rec)


def test_audit_trail_verifies_after_all_requests(server, keys, audit_dir, signing_key):
    """The session's trail (this test's own requests first, so it is never empty): every link, every
    signed checkpoint checked with the public key, a record for each of these requests."""
    rids = []
    for protocol in PROTOCOLS:
        c = PipelineClient(url(server, protocol), protocol=protocol, key=keys.key("k1"), key_id="k1",
                           client_id=f"trail-{protocol}")
        rids.append(c.classify(samples.photo("coffee"), top_k=1).request_id)
        c.close()
    signed_trail(audit_dir, signing_key[1], rids)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_several_envelopes_in_one_request_refused(server, keys, audit_dir, protocol):
    """A client-side batch would get one response for several envelopes: refused clearly, audited."""
    client = PipelineClient(url(server, protocol), protocol=protocol, key=keys.key("k1"), key_id="k1",
                            client_id="batch-sender")
    kwargs = client.request(client.seal(samples.photo("coffee")), 1, uuid.uuid4().hex)
    two = [client.seal(samples.photo("coffee")), client.seal(samples.photo("chelsea"))]
    kwargs["inputs"][0] = (grpcclient if protocol == "grpc" else httpclient).InferInput("ENVELOPE", [2, 1], "BYTES")
    kwargs["inputs"][0].set_data_from_numpy(np.array(two, dtype=np.object_).reshape(2, 1))
    with pytest.raises(InferenceServerException) as info:
        client.client.infer(**kwargs)
    assert "one envelope per request, got 2" in info.value.message()
    [rec] = records_for(audit_dir, kwargs["request_id"])
    assert rec["reason"] == "batched_request"
    client.close()
