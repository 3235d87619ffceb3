"""The cascade (issue 12) on a real tritonserver over real sockets: routes by measured confidence,
answers equal to the routed model's, and bad input treated exactly as the pipeline treats it.

One server per module loads ``pipeline`` and ``cascade`` side by side (the same stages' code), so a
bad envelope can be sent to both and the answers compared."""
from __future__ import annotations

import io
import re
import uuid

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from clients.evaluate import reference
from rtinfer import envelope, imaging, routing
from rtinfer.launch.server import TritonServer
from rtinfer.postprocess import softmax

from conftest import REPO, require_model, settled
from helpers import batch_stats, cascade_policy, png_header_only, records_for, send_mixed, signed_trail, tampered

EDGE, BIG = REPO / "classifier_onnx" / "1" / "model.onnx", REPO / "classifier_big" / "1" / "model.onnx"
MODELS = ("pipeline", "cascade", "classifier_big")


@pytest.fixture(scope="module")
def cascade_server(keyring_path, signing_key, tmp_path_factory):
    require_model()
    if not BIG.exists():
        pytest.fail("classifier_big is not built: run `make engines`")
    audit_dir = tmp_path_factory.mktemp("audit-cascade")
    with TritonServer(models=MODELS, keyring=str(keyring_path), audit_dir=str(audit_dir),
                      audit_signing_key=str(signing_key[0]), workdir=tmp_path_factory.mktemp("triton-cascade")) as srv:
        srv.audit_dir = audit_dir
        yield srv


def client(srv, keys, pipeline="cascade", **kw):
    return PipelineClient(srv.grpc_url, key=keys.key("k1"), key_id="k1", client_id="cascade-tester",
                          pipeline=pipeline, **kw)


def candidates() -> dict[str, bytes]:
    """The bundled photos and a few degraded versions: a spread of edge confidences to choose from."""
    out = {}
    for name in samples.SKIMAGE_PHOTOS:
        data = samples.photo(name)
        out[name] = data
        img = Image.open(io.BytesIO(data)).convert("RGB")
        for kind, im in (("grey", img.convert("L").convert("RGB")),
                         ("blurred", img.resize((24, 24)).resize(img.size))):
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=92)
            out[f"{name}-{kind}"] = buf.getvalue()
    return out


def photo_files(tmp_path, photos: dict[str, bytes]) -> list:
    files = []
    for name, data in photos.items():
        files.append(tmp_path / f"{name}.jpg")
        files[-1].write_bytes(data)
    return files


def offline(tmp_path, photos: dict[str, bytes]):
    """Both classifiers offline on the same bytes, each under its own crop (224 / 260)."""
    files = photo_files(tmp_path, photos)
    return softmax(reference(EDGE, files, 224)), softmax(reference(BIG, files, 260))


def test_confident_images_stay_on_the_edge_uncertain_ones_escalate(cascade_server, keys, tmp_path):
    photos = candidates()
    names = list(photos)
    edge_p, big_p = offline(tmp_path, photos)
    policy = cascade_policy()
    escalate, conf = policy.decide(edge_p)
    order = np.argsort(conf)
    unsure, sure = order[0], order[-1]  # the least and the most confident, by measurement
    assert escalate[unsure] and not escalate[sure], (policy, dict(zip(names, conf.round(3))))
    c = client(cascade_server, keys)
    try:
        for i in range(len(names)):  # every candidate: routed as measured, answered by that model
            res = c.classify(photos[names[i]], top_k=5)
            [rec] = records_for(cascade_server.audit_dir, res.request_id)
            want_route = routing.CLOUD if escalate[i] else routing.EDGE
            routed = big_p[i] if escalate[i] else edge_p[i]
            assert rec["event"] == "served" and rec["stage"] == "cascade", (names[i], rec)
            assert rec["route"] == want_route, (names[i], rec)
            assert res.predictions[0].index == int(routed.argmax()) == rec["top1"]["index"], names[i]
            assert [p.index for p in res.predictions] == list(np.argsort(-routed)[:5]), names[i]
            assert abs(res.predictions[0].score - float(routed.max())) < 1e-3
            assert rec["confidence"] == pytest.approx(float(conf[i]), abs=1e-4)
            assert rec["confidence_metric"] == policy.metric and rec["threshold"] == policy.threshold
            models = rec["models"]
            assert models["edge"].startswith("classifier_onnx/1:model.onnx@") and "manifest" not in models["edge"]
            assert models["cloud"].startswith("classifier_big/1@") and "manifest" not in models["cloud"]
            assert models["classifier"] == (models["cloud"] if escalate[i] else models["edge"])
            assert rec["hash"] == res.audit_ref and rec["client_id"] == c.client_id
    finally:
        c.close()


def bad_envelopes(c: PipelineClient, keys) -> dict:
    """name -> envelope sealed for ``c.pipeline`` with one thing wrong (as test_pipeline_server's cases)."""
    p = c.pipeline
    return {
        "tampered": tampered(c.seal(samples.photo("coffee"))),
        "wrong key": envelope.seal(b"x" * 100, keys.key("k2"), key_id="k1", client_id=c.client_id, pipeline=p),
        "unknown key": envelope.seal(b"x", b"\1" * 32, key_id="k9", client_id=c.client_id, pipeline=p),
        "truncated": c.seal(samples.photo("coffee"))[:20],
        "wrong audience": envelope.seal(samples.photo("coffee"), keys.key("k1"), key_id="k1",
                                        client_id=c.client_id, pipeline="other_service"),
        "wrong client": envelope.seal(samples.photo("coffee"), keys.key("k1"), key_id="k1",
                                      client_id="somebody-else", pipeline=p),
        "corrupt image": c.seal(samples.photo("coffee")[:3000]),
        "not an image": c.seal(b"GIF89a definitely not a photo"),
        "decompression bomb": c.seal(png_header_only(60_000, 60_000)),
        "oversized": c.seal(b"\0" * (8 * 1024 * 1024 + 1)),
    }


def refusal(c: PipelineClient, sealed: bytes) -> tuple[str, str, str]:
    rid = uuid.uuid4().hex
    with pytest.raises(InferenceServerException) as info:
        c.infer_envelope(sealed, request_id=rid)
    msg = info.value.message()
    assert "Traceback" not in msg and ".py" not in msg and "k9" not in msg
    return re.sub(r"^in ensemble '\w+', ", "", msg), str(info.value.status()), rid


def test_bad_input_gets_the_same_clear_errors_as_pipeline_and_is_audited(cascade_server, keys):
    pipe, casc = client(cascade_server, keys, "pipeline"), client(cascade_server, keys, "cascade")
    try:
        want, got = bad_envelopes(pipe, keys), bad_envelopes(casc, keys)
        for case in want:
            p_msg, p_status, p_rid = refusal(pipe, want[case])
            c_msg, c_status, c_rid = refusal(casc, got[case])
            # the same words; sizes may differ by the audience's length in the envelope header
            assert (re.sub(r"\d+", "N", c_msg), c_status) == (re.sub(r"\d+", "N", p_msg), p_status), case
            assert c_status == "StatusCode.INVALID_ARGUMENT", case
            [p_rec] = records_for(cascade_server.audit_dir, p_rid)
            [c_rec] = records_for(cascade_server.audit_dir, c_rid)
            assert c_rec["event"] == "rejected" and c_rec["stage"] == "cascade", case
            assert c_rec["reason"] == p_rec["reason"], case
        # an envelope sealed for one service is refused by the other
        for src, dst in ((pipe, casc), (casc, pipe)):
            msg, status, _ = refusal(dst, src.seal(samples.photo("coffee")))
            assert "authentication failed" in msg and status == "StatusCode.INVALID_ARGUMENT"
        assert casc.classify(samples.photo("coffee"), top_k=1).predictions[0].index == 967
    finally:
        pipe.close()
        casc.close()


def test_one_bad_request_in_a_cascade_batch_fails_alone(cascade_server, keys):
    """Concurrent requests, every third tampered: batches form in the cascade, only the bad ones fail."""
    before = batch_stats(cascade_server, "cascade")
    send_mixed(lambda: client(cascade_server, keys, aio=True), "cmix")
    after = batch_stats(cascade_server, "cascade")
    assert sum(after.get(b, 0) - before.get(b, 0) for b in after if b > 1) > 0, (before, after)
    for i in range(24):
        [rec] = records_for(cascade_server.audit_dir, f"cmix-{i}")
        assert rec["event"] == ("rejected" if i % 3 == 0 else "served")


def test_cascade_audit_chain_verifies(cascade_server, keys, signing_key):
    """The module server's trail (this test's own requests first, so it is never empty): every link, every
    signed checkpoint checked with the public key, the cascade's chain holding these requests."""
    c = client(cascade_server, keys)
    rids = [c.classify(samples.photo(name), top_k=1).request_id for name in ("coffee", "chelsea")]
    c.close()
    signed_trail(cascade_server.audit_dir, signing_key[1], rids, chains=("cascade",))
    assert all(r["stage"] == "cascade" for rid in rids for r in records_for(cascade_server.audit_dir, rid))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_gateway_exposes_the_cascade_and_refuses_its_classifiers(cascade_server, keys, protocol, tmp_path):
    """`make serve` exposes pipeline and cascade; the big classifier (raw tensors, no envelope, no audit)
    stays behind the gateway like the other composing models."""
    from rtinfer.launch.gateway import Gateway

    from conftest import require_haproxy
    require_haproxy()
    with Gateway.in_front_of(cascade_server, model="pipeline,cascade", workdir=tmp_path) as gw:
        target = gw.grpc_url if protocol == "grpc" else gw.http_url
        for name in ("cascade", "pipeline"):
            c = PipelineClient(target, protocol=protocol, key=keys.key("k1"), key_id="k1", client_id="gw",
                               pipeline=name)
            assert c.classify(samples.photo("coffee"), top_k=1).predictions[0].index == 967
            c.close()
        for name in ("classifier_big", "classifier_onnx", "preprocess", "cascadeX", "pipeline,cascade"):
            c = PipelineClient(target, protocol=protocol, key=keys.key("k1"), key_id="k1", client_id="gw",
                               pipeline=name)
            with pytest.raises(InferenceServerException) as info:
                c.classify(samples.photo("coffee"), top_k=1)
            c.close()
            # a ',' in an HTTP path is a reserved character: refused as a malformed path before any model check
            refused = ("400",) if protocol == "http" and "," in name else ("403", "StatusCode.PERMISSION_DENIED")
            assert str(info.value.status()) in refused, (name, info.value)


def test_the_gpu_hosts_edge_model_serves_the_installed_files(tmp_path):
    """classifier_edge (GPU hosts' cascade: Lite0 on CPU instances) is classifier_onnx's version directory:
    loaded here with its default config, it answers as the installed portable file does offline."""
    x = imaging.preprocess(samples.photo("coffee"))[np.newaxis]
    sess = ort.InferenceSession(str(REPO / "classifier_onnx" / "1" / "model.portable.onnx"),
                                providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input": x})[0]
    with TritonServer(models=("classifier_edge",), workdir=tmp_path) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        inp = grpcclient.InferInput("input", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        got = c.infer("classifier_edge", [inp]).as_numpy("logits")
        c.close()
    assert got.argmax() == want.argmax() == 967
    assert np.allclose(got, want, atol=1e-3)


def test_routes_are_counted_on_the_metrics_port(cascade_server, keys, tmp_path):
    """rtinfer_cascade_routes_total{route} (every route's series exists at zero) grows with the answers."""
    import urllib.request
    photos = {name: samples.photo(name) for name in samples.SKIMAGE_PHOTOS}
    escalate, conf = cascade_policy().decide(softmax(reference(EDGE, photo_files(tmp_path, photos), 224)))
    order = np.argsort(conf)  # measured, as the test above: the least confident escalates, the most stays
    unsure, sure = list(photos)[order[0]], list(photos)[order[-1]]
    assert escalate[order[0]] and not escalate[order[-1]], dict(zip(photos, conf.round(3)))

    def counts():
        text = urllib.request.urlopen(cascade_server.metrics_url, timeout=10).read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(
            r'rtinfer_cascade_routes_total\{[^}]*route="(\w+)"[^}]*\} ([0-9.e+]+)', text)}
    before = counts()
    assert set(before) == {routing.EDGE, routing.CLOUD, routing.EDGE_FALLBACK}, before
    c = client(cascade_server, keys)
    for name in (sure, unsure):
        c.classify(photos[name], top_k=1)
    c.close()
    after = settled(counts)
    assert after[routing.EDGE] - before[routing.EDGE] == 1 and after[routing.CLOUD] - before[routing.CLOUD] == 1
    assert after[routing.EDGE_FALLBACK] == before[routing.EDGE_FALLBACK]
