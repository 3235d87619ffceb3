"""The gateway (HAProxy + deploy/gateway/policy.lua) in front of a real tritonserver: only the
pipeline is reachable, over gRPC and HTTP, and the pipeline behaves as without it.

Every test talks to real sockets on free loopback ports. Controls sent straight to Triton
(bypassing the gateway, as only a party on the host can) show that the refused requests
would otherwise have been served, so a refusal here is the gateway's doing.
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import struct
import subprocess
import sys
import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import access
from rtinfer.launch.gateway import CONFIG_DIR, MAX_REQUEST_BYTES, Gateway
from rtinfer.launch.process import free_port
from rtinfer.launch.server import ROOT

from conftest import GATED_ADMIN_KEY, GATED_API_KEY, require_haproxy
from helpers import log_after
from test_pipeline_server import BAD_ENVELOPES, CATS, expect_rejected, records_for

PROTOCOLS = ["grpc", "http"]
INFER = "/inference.GRPCInferenceService/ModelInfer"
COMPOSING = ["preprocess", "classifier_onnx", "postprocess"]  # the steps the CPU pipeline loads
OTHER_MODELS = sorted(p.name for p in (ROOT / "model_repository").iterdir()
                      if (p / "config.pbtxt").exists() and p.name != "pipeline")
REFUSED = ("403", "StatusCode.PERMISSION_DENIED")


@pytest.fixture(scope="module")
def gateway(gated_triton, tmp_path_factory):
    require_haproxy()
    with Gateway.in_front_of(gated_triton, api_keys=[GATED_API_KEY], workdir=tmp_path_factory.mktemp("gw")) as gw:
        yield gw


def pipeline_client(url, protocol, **kw):
    return PipelineClient(url, protocol=protocol, key=kw.pop("keys").key("k1"), key_id="k1",
                          client_id=f"gw-{protocol}", **{"api_key": GATED_API_KEY, **kw})


def url(target, protocol):
    return target.grpc_url if protocol == "grpc" else target.http_url


def triton_client(target, protocol):
    return (grpcclient if protocol == "grpc" else httpclient).InferenceServerClient(url(target, protocol))


# ------------------------------------------------------------------ limits

def test_limits_are_consistent_with_the_envelope_limit():
    """An oversized envelope must still reach preprocess (its clear error), and a whole gRPC
    request must fit the buffer the body is read into."""
    cfg = (CONFIG_DIR / "haproxy.cfg").read_text()
    pbtxt = (ROOT / "model_repository" / "preprocess" / "config.pbtxt").read_text()
    envelope_limit = int(re.search(r'"max_envelope_bytes" value: \{ string_value: "(\d+)"', pbtxt).group(1))
    bufsize = int(re.search(r"^\s*tune\.bufsize (\d+)$", cfg, re.M).group(1))
    settings = "\n".join(line.split("#")[0] for line in cfg.splitlines())
    limits = {int(n) for n in re.findall(r"\b(\d{6,})\b", settings)} - {bufsize}
    assert limits == {MAX_REQUEST_BYTES}, limits
    assert envelope_limit + 4096 <= MAX_REQUEST_BYTES <= bufsize - 32 * 1024


# ------------------------------------------------------------------ the pipeline still serves

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pipeline_serves_through_the_gateway(gateway, gated_triton, keys, protocol):
    c = pipeline_client(url(gateway, protocol), protocol, keys=keys)
    cat = c.classify(samples.photo("chelsea"), top_k=5)
    coffee = c.classify(samples.photo("coffee"), top_k=1)
    c.close()
    assert cat.predictions[0].index in CATS, cat.predictions
    assert coffee.predictions[0].index == 967
    [rec] = records_for(gated_triton.audit_dir, cat.request_id)
    assert rec["event"] == "served" and rec["hash"] == cat.audit_ref


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(BAD_ENVELOPES))
def test_bad_envelopes_keep_their_clear_errors_through_the_gateway(gateway, gated_triton, keys, protocol, case):
    client = pipeline_client(url(gateway, protocol), protocol, keys=keys)
    make, fragment, reason = BAD_ENVELOPES[case]
    expect_rejected(client, make(client, keys), fragment, reason, gated_triton.audit_dir)
    client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_dtype_and_shape_still_rejected_by_triton(gateway, protocol):
    mod = grpcclient if protocol == "grpc" else httpclient
    c = triton_client(gateway, protocol)
    bad_dtype = mod.InferInput("ENVELOPE", [1, 1], "FP32")
    bad_dtype.set_data_from_numpy(np.zeros((1, 1), np.float32))
    bad_shape = mod.InferInput("ENVELOPE", [1, 3], "BYTES")
    bad_shape.set_data_from_numpy(np.array([[b"a", b"b", b"c"]], dtype=np.object_))
    for inp, fragments in ((bad_dtype, ("data-type", "data type")), (bad_shape, ("shape",))):
        with pytest.raises(InferenceServerException) as info:
            c.infer("pipeline", [inp], headers=access.headers(protocol, GATED_API_KEY))
        assert any(f in info.value.message().lower() for f in fragments), info.value.message()
        assert "gateway" not in info.value.message()
    c.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_several_envelopes_in_one_request_still_refused_clearly(gateway, gated_triton, keys, protocol):
    client = pipeline_client(url(gateway, protocol), protocol, keys=keys)
    kwargs = client.request(client.seal(samples.photo("coffee")), 1, uuid.uuid4().hex)
    two = [client.seal(samples.photo("coffee")), client.seal(samples.photo("chelsea"))]
    kwargs["inputs"][0] = client._m.InferInput("ENVELOPE", [2, 1], "BYTES")
    kwargs["inputs"][0].set_data_from_numpy(np.array(two, dtype=np.object_).reshape(2, 1))
    with pytest.raises(InferenceServerException) as info:
        client.client.infer(**kwargs)
    client.close()
    assert "one envelope per request, got 2" in info.value.message()
    [rec] = records_for(gated_triton.audit_dir, kwargs["request_id"])
    assert rec["reason"] == "batched_request"


# ------------------------------------------------------------------ composing models refused

def envelope_request(model: str, sealed: bytes, client_id: str) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model, id=uuid.uuid4().hex)
    req.parameters["client_id"].string_param = client_id
    req.inputs.add(name="ENVELOPE", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(struct.pack("<I", len(sealed)) + sealed)
    return req


def classifier_request(model: str) -> service_pb2.ModelInferRequest:
    """Raw tensors for classifier_onnx: no envelope, no key, no audit record."""
    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="UINT8", shape=[1, 224, 224, 3])
    req.raw_input_contents.append(np.zeros((1, 224, 224, 3), np.uint8).tobytes())
    return req


def name_field(name: str) -> bytes:
    """A ModelInferRequest field 1 (model_name) on its own, to append to a serialized request."""
    data = name.encode()
    assert len(data) < 128
    return b"\x0a" + bytes([len(data)]) + data


def raw_infer(target_url: str, body: bytes, **call_kw) -> service_pb2.ModelInferResponse:
    """One unary ModelInfer with hand-made bytes (no serializer) and the inference key."""
    with grpc.insecure_channel(target_url) as channel:
        call = channel.unary_unary(INFER)
        reply = call(body, metadata=list(access.headers("grpc", GATED_API_KEY).items()), timeout=60, **call_kw)
    return service_pb2.ModelInferResponse.FromString(reply)


def raw_refusal(target_url: str, body: bytes, **call_kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        raw_infer(target_url, body, **call_kw)
    return info.value


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", OTHER_MODELS)
def test_every_other_model_is_refused(gateway, keys, protocol, model):
    """Each composing step (and every other model of the repository), with a valid key."""
    c = pipeline_client(url(gateway, protocol), protocol, keys=keys, pipeline=model)
    with pytest.raises(InferenceServerException) as info:
        c.classify(samples.photo("chelsea"), top_k=1)
    c.close()
    assert str(info.value.status()) in REFUSED and "gateway:" in info.value.message(), info.value


def test_control_triton_alone_serves_a_composing_model_to_anyone_with_the_key(gated_triton, gateway):
    """What the gateway closes: Triton answers classifier_onnx directly (raw tensors, no envelope)."""
    body = classifier_request("classifier_onnx").SerializeToString()
    assert raw_infer(gated_triton.grpc_url, body).model_name == "classifier_onnx"
    err = raw_refusal(gateway.grpc_url, body)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "model not exposed" in err.details()


def test_repeated_model_name_is_refused(gated_triton, gateway):
    """protobuf keeps the LAST model_name: 'pipeline' first, a composing model second reaches that model."""
    body = classifier_request("pipeline").SerializeToString() + name_field("classifier_onnx")
    assert service_pb2.ModelInferRequest.FromString(body).model_name == "classifier_onnx"
    assert raw_infer(gated_triton.grpc_url, body).model_name == "classifier_onnx"  # the bypass, without the gateway
    err = raw_refusal(gateway.grpc_url, body)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err


@pytest.mark.parametrize("fields", [["pipeline", "pipeline"], ["preprocess", "pipeline"], []],
                         ids=["pipeline-twice", "pipeline-last", "no-name"])
def test_model_name_must_appear_exactly_once(gateway, keys, fields):
    sealed = PipelineClient("unused:1", key=keys.key("k1"), key_id="k1", client_id="gw-raw").seal(
        samples.photo("chelsea"))
    req = envelope_request("pipeline", sealed, "gw-raw")
    req.ClearField("model_name")
    body = req.SerializeToString() + b"".join(name_field(n) for n in fields)
    assert raw_refusal(gateway.grpc_url, body).code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_model_name_cannot_forge_log_lines(gateway):
    mark = len(gateway.log_text())
    body = classifier_request("").SerializeToString() + name_field("x\nrefused=- model=pipeline")
    assert raw_refusal(gateway.grpc_url, body).code() == grpc.StatusCode.PERMISSION_DENIED
    [line] = log_after(gateway, mark, r"refused=model_not_allowed")
    assert "model=x?refused?-?model?pipeline refused=model_not_allowed" in line, line


def test_raw_request_naming_the_pipeline_once_is_served(gateway, keys):
    """The same hand-made request with exactly one model_name goes through (the refusals above are
    about the name, not about raw requests)."""
    sealed = PipelineClient("unused:1", key=keys.key("k1"), key_id="k1", client_id="gw-raw").seal(
        samples.photo("coffee"))
    req = envelope_request("pipeline", sealed, "gw-raw")
    req.outputs.add(name="AUDIT_REF")
    reply = raw_infer(gateway.grpc_url, req.SerializeToString())
    assert reply.model_name == "pipeline" and len(reply.raw_output_contents) == 1


@pytest.mark.parametrize("body", [b"\x0a\x80", b"\x0b\x00", b"\x0a\x08pipeline\x0a\xff\xff\xff\xff\x0f"],
                         ids=["truncated-varint", "group-wire-type", "length-past-the-end"])
def test_malformed_messages_are_refused(gateway, body):
    assert raw_refusal(gateway.grpc_url, body).code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("model", ["classifier_onnx", "pipeline"])
def test_compressed_grpc_message_is_refused(gated_triton, gateway, model):
    """A gzip'd message hides its model name; Triton itself accepts it. (gRPC sends a message
    uncompressed when gzip does not make it smaller, as with a sealed envelope: zeros here.)"""
    body = classifier_request(model).SerializeToString()
    if model == "classifier_onnx":
        assert raw_infer(gated_triton.grpc_url, body, compression=grpc.Compression.Gzip).model_name == model
    err = raw_refusal(gateway.grpc_url, body, compression=grpc.Compression.Gzip)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED and "compressed" in err.details(), err


def test_streaming_inference_is_refused(gateway, keys):
    """Refused before any message is read; the client's open stream then ends in RST_STREAM(CANCEL),
    which gRPC may report as CANCELLED rather than PERMISSION_DENIED. Either way nothing is served."""
    mark = len(gateway.log_text())
    sealed = PipelineClient("unused:1", key=keys.key("k1"), key_id="k1", client_id="gw-raw").seal(
        samples.photo("coffee"))
    body = envelope_request("pipeline", sealed, "gw-raw").SerializeToString()
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([body]), metadata=list(access.headers("grpc", GATED_API_KEY).items()), timeout=30))
    assert info.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.CANCELLED), info.value
    assert log_after(gateway, mark, r"route=ModelStreamInfer .*refused=route_not_allowed")


def test_oversized_requests_are_refused_at_the_gateway(gateway, keys):
    too_big = b"\0" * (MAX_REQUEST_BYTES + 1)
    for protocol in PROTOCOLS:
        c = pipeline_client(url(gateway, protocol), protocol, keys=keys)
        kwargs = c.request(too_big, 1)  # not sealed: it must not get as far as preprocess
        with pytest.raises(InferenceServerException) as info:
            c.client.infer(**kwargs)
        c.close()
        assert "larger than the gateway's limit" in info.value.message(), info.value
        assert str(info.value.status()) in ("413", "StatusCode.RESOURCE_EXHAUSTED")


# ------------------------------------------------------------------ other APIs

GRPC_ADMIN = {
    "repository index": lambda c, h: c.get_model_repository_index(headers=h),
    "load": lambda c, h: c.load_model("preprocess", headers=h),
    "unload": lambda c, h: c.unload_model("pipeline", headers=h),
    "statistics": lambda c, h: c.get_inference_statistics("pipeline", headers=h),
    "shared memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "cuda shared memory": lambda c, h: c.get_cuda_shared_memory_status(headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
    "logging": lambda c, h: c.get_log_settings(headers=h),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("api", list(GRPC_ADMIN))
def test_admin_and_statistics_apis_are_refused_even_with_the_admin_key(gateway, gated_triton, protocol, api):
    c = triton_client(gateway, protocol)
    admin = access.headers(protocol, api_key=GATED_API_KEY, admin_key=GATED_ADMIN_KEY)
    with pytest.raises(InferenceServerException) as info:
        GRPC_ADMIN[api](c, admin)
    c.close()
    assert str(info.value.status()) in REFUSED, info.value
    assert triton_client(gated_triton, protocol).is_model_ready("pipeline")  # nothing was unloaded


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_is_open_metadata_needs_the_key_steps_are_readable_over_http_only(gateway, gated_triton, protocol):
    """Health and readiness stay open (probes); a model's config and metadata need the inference key.
    Over HTTP the gateway answers them from its stripped snapshot, the pipeline's steps' too (what
    perf_analyzer reads): no parameters (key-file paths, audit directories, the cloud's address). Over gRPC
    the steps' stay refused (a Lua service cannot send gRPC trailers); a step is never ready nor inferable."""
    c = triton_client(gateway, protocol)
    key = access.headers(protocol, GATED_API_KEY)
    assert c.is_server_live() and c.is_server_ready() and c.get_server_metadata()
    assert c.is_model_ready("pipeline")
    for model in ["pipeline"] + (COMPOSING if protocol == "http" else []):
        for call in (c.get_model_metadata, c.get_model_config):
            for headers, status in ((None, "401"), ({k: "wrong" for k in key}, "401")):
                with pytest.raises(InferenceServerException) as info:
                    call(model, headers=headers)
                assert str(info.value.status()) in (status, "StatusCode.UNAUTHENTICATED"), (model, info.value)
                assert "API key" in info.value.message()
    meta = c.get_model_metadata("pipeline", headers=key, as_json=True) if protocol == "grpc" else \
        c.get_model_metadata("pipeline", headers=key)
    assert meta["name"] == "pipeline"
    assert c.get_model_config("pipeline", headers=key)
    direct = httpclient.InferenceServerClient(gated_triton.http_url)
    for model in COMPOSING:
        if protocol == "http":
            assert c.get_model_metadata(model, headers=key)["name"] == model
            config = c.get_model_config(model, headers=key)
            assert config["name"] == model and config["input"] and config["output"]
            assert direct.get_model_config(model)["parameters"]  # Triton's own config has them
            assert "parameters" not in config and "default_model_filename" not in config, config.keys()
        else:
            for call in (c.get_model_metadata, c.get_model_config):
                with pytest.raises(InferenceServerException) as info:
                    call(model, headers=key)
                assert str(info.value.status()) in REFUSED, (model, info.value)
        if protocol == "http":  # tritonclient.http answers False instead of raising
            assert not c.is_model_ready(model, headers=key)
        else:
            with pytest.raises(InferenceServerException):
                c.is_model_ready(model, headers=key)
    direct.close()
    c.close()


def test_metrics_port_serves_triton_and_gateway_metrics_only(gateway):
    def get(path):
        conn = http.client.HTTPConnection(gateway.host, gateway.metrics_port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    status, text = get("/metrics")
    assert status == 200 and re.search(r'nv_inference_request_success\{[^}]*model="pipeline"', text)
    status, text = get("/gateway/metrics")
    assert status == 200 and "haproxy_frontend_http_requests_total" in text
    for path in ("/v2/models/stats", "/metrics/../v2/repository/index", "/v2/health/ready"):
        assert get(path)[0] == 403, path


# ------------------------------------------------------------------ HTTP path variants

def http_infer_body(keys):
    c = PipelineClient("unused:1", protocol="http", key=keys.key("k1"), key_id="k1", client_id="gw-path")
    kwargs = c.request(c.seal(samples.photo("chelsea")), 1)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        kwargs["inputs"], outputs=kwargs["outputs"], request_id=kwargs["request_id"], parameters=kwargs["parameters"])
    return body, {"Inference-Header-Content-Length": str(json_size), "Content-Type": "application/octet-stream",
                  **access.headers("http", GATED_API_KEY)}


def http_send(target, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(target.host, target.http_port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})  # the path goes out exactly as written
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


PATHS_TO_OTHER_MODELS = [
    "/v2/models/preprocess/infer",
    "/v2/models/preprocess/versions/1/infer",
    "/v2/models/%70reprocess/infer",
    "/v2/models/%70%72%65%70%72%6f%63%65%73%73/infer",
    "/v2/models/pipeline/../preprocess/infer",
    "/v2/models/pipeline/%2e%2e/preprocess/infer",
    "/v2/models/pipeline/infer/../../preprocess/infer",
    "//v2//models//preprocess//infer",
    "/v2/models/./preprocess/./infer",
    "/v2/models/pipeline%2F..%2Fpreprocess/infer",
    "/v2/models/pipeline%2f..%2fpreprocess/infer",
    "/v2/models/preprocess/infer?model=pipeline",
    "/v2/models/preprocess%00/infer",
    "/v2/models/PREPROCESS/infer",
    "/V2/models/preprocess/infer",
    "/v2/models/Pipeline/infer",
    "/v2/models/pipeline%2Finfer",
    "/v2/models/pipeline/versions/01/infer",
    "/v2/models/pipeline/versions/1/../../../preprocess/infer",
    "/v2/models/classifier_onnx/infer",
    "/v2/models/postprocess/versions/1/infer",
    "/../v2/models/pipeline/infer",
    "/v2/models/pipeline/infer%",
    "/v2/models/pipeline/generate",
    "http://127.0.0.1/v2/models/preprocess/infer",
]


@pytest.mark.parametrize("path", PATHS_TO_OTHER_MODELS)
def test_http_path_variants_are_refused(gateway, gated_triton, keys, path):
    mark = len(gateway.log_text())
    body, headers = http_infer_body(keys)
    resp, data = http_send(gateway, "POST", path, body, headers)
    assert resp.status in (400, 403, 404), (path, resp.status, data[:200])
    assert b"gateway:" in data, data[:200]
    assert log_after(gateway, mark, r" http 40[034] .*refused=(route_not_allowed|bad_path)"), path


def test_http_fragment_in_the_request_line_is_refused_by_the_parser(gateway, keys):
    body, headers = http_infer_body(keys)
    resp, data = http_send(gateway, "POST", "/v2/models/preprocess/infer#/v2/models/pipeline/infer", body, headers)
    assert resp.status == 400 and b"Bad request" in data


PATHS_TO_THE_PIPELINE = [
    "/v2/models/pipeline/infer",
    "/v2/models/pipeline/versions/1/infer",
    "/v2//models/./pipeline/infer?x=1",
    "/v2/models/%70ipeline/infer",
    "/v2/models/preprocess/../pipeline/infer",
    "//v2/models/pipeline//versions/1//infer",
]


@pytest.mark.parametrize("path", PATHS_TO_THE_PIPELINE)
def test_http_path_variants_of_the_pipeline_are_served_on_the_canonical_path(gateway, gated_triton, keys, path):
    body, headers = http_infer_body(keys)
    resp, data = http_send(gateway, "POST", path, body, headers)
    assert resp.status == 200, (path, resp.status, data[:300])
    result = httpclient.InferenceServerClient.parse_response_body(
        data, header_length=resp.getheader("Inference-Header-Content-Length"))
    label = result.as_numpy("PROBS").reshape(-1)[0].decode()
    assert int(label.split(":")[1]) in CATS, label


@pytest.mark.parametrize("method, path", [("GET", "/v2/models/pipeline/infer"), ("POST", "/v2/health/live"),
                                          ("DELETE", "/v2/models/pipeline"), ("POST", "/v2/repository/index"),
                                          ("POST", "/v2/repository/models/pipeline/unload"),
                                          ("GET", "/v2/models/pipeline/stats"), ("GET", "/v2/models/stats"),
                                          ("GET", "/v2/systemsharedmemory/status"),
                                          ("GET", "/v2/cudasharedmemory/status"), ("GET", "/v2/trace/setting"),
                                          ("GET", "/v2/models/pipeline/trace/setting"), ("GET", "/v2/logging")])
def test_http_methods_and_admin_paths_are_refused(gateway, method, path):
    admin = access.headers("http", api_key=GATED_API_KEY, admin_key=GATED_ADMIN_KEY)
    resp, data = http_send(gateway, method, path, b"{}" if method == "POST" else None, admin)
    assert resp.status in (403, 405) and b"gateway:" in data, (method, path, resp.status, data[:200])


def test_http_get_with_a_body_is_refused(gateway):
    """A body on a GET is refused: no backend gets the chance to read it as a second request."""
    inner = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    resp, data = http_send(gateway, "GET", "/v2/health/live", inner, {"Content-Length": str(len(inner))})
    assert resp.status == 400 and b"takes no body" in data
    assert http_send(gateway, "GET", "/v2/health/live")[0].status == 200


# ------------------------------------------------------------------ API key at the gateway

@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("key", [None, "wrong-key", GATED_ADMIN_KEY], ids=["missing", "wrong", "admin-key"])
def test_missing_or_wrong_api_key_is_refused_and_logged(gateway, gated_triton, keys, protocol, key):
    mark = len(gateway.log_text())
    c = pipeline_client(url(gateway, protocol), protocol, keys=keys, api_key=key or "")
    rid = uuid.uuid4().hex
    with pytest.raises(InferenceServerException) as info:
        c.classify(samples.photo("coffee"), top_k=1, request_id=rid)
    c.close()
    assert str(info.value.status()) in ("401", "StatusCode.UNAUTHENTICATED"), info.value
    reason = "api_key_missing" if key is None else "api_key_wrong"
    [line] = log_after(gateway, mark, rf" {protocol} .*refused={reason}")
    assert re.search(r"(/infer|ModelInfer) ", line), line
    assert not key or key not in gateway.log_text()  # the log never holds a key
    assert records_for(gated_triton.audit_dir, rid) == []  # refused before Triton: only the gateway log has it


def test_repeated_api_key_header_is_refused(gateway, keys):
    body, headers = http_infer_body(keys)
    conn = http.client.HTTPConnection(gateway.host, gateway.http_port, timeout=30)
    conn.putrequest("POST", "/v2/models/pipeline/infer")
    for name, value in [*headers.items(), ("x-api-key", "wrong-key"), ("Content-Length", str(len(body)))]:
        conn.putheader(name, value)
    conn.endheaders(body)
    resp = conn.getresponse()
    assert resp.status in (400, 401) and b"API key" in resp.read()
    conn.close()


# ------------------------------------------------------------------ rate limit

def test_per_client_rate_limit(gated_triton, tmp_path):
    require_haproxy()
    with Gateway.in_front_of(gated_triton, api_keys=[GATED_API_KEY], rate_limit=5, workdir=tmp_path) as gw:
        statuses = [http_send(gw, "GET", "/v2/health/live")[0].status for _ in range(8)]
        c = grpcclient.InferenceServerClient(gw.grpc_url)
        with pytest.raises(InferenceServerException) as info:
            c.is_server_live()
        c.close()
    assert statuses[:5] == [200] * 5 and set(statuses[5:]) == {429}, statuses
    assert str(info.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "refused=rate_limited" in gw.log_text()


# ------------------------------------------------------------------ what `make serve` runs

def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return out


def test_serve_command_puts_the_gateway_in_front_of_a_loopback_triton(keyring_path, keys, tmp_path):
    """`python -m rtinfer.launch.gateway` (make serve): Triton on 127.0.0.1 only, the gateway on the given
    ports; the pipeline served, a composing step refused; SIGTERM stops both."""
    require_haproxy()
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "rtinfer.launch.gateway", "--keyring", str(keyring_path),
           "--audit-dir", str(tmp_path / "audit"),
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("gateway ready"), "".join(lines)
        triton = re.search(r"on loopback: HTTP (\S+):\d+\s+gRPC (\S+):\d+", lines[1])
        assert triton and triton.group(1) == triton.group(2) == "127.0.0.1", lines[1]
        for protocol, port in (("grpc", grpc_port), ("http", http_port)):
            c = PipelineClient(f"127.0.0.1:{port}", protocol=protocol, key=keys.key("k1"), key_id="k1",
                               client_id="serve")
            assert c.classify(samples.photo("chelsea"), top_k=1).predictions[0].index in CATS
            c.pipeline = "preprocess"
            with pytest.raises(InferenceServerException) as info:
                c.classify(samples.photo("chelsea"), top_k=1)
            assert str(info.value.status()) in REFUSED
            c.close()
        children = children_of(proc.pid)
        assert len(children) == 2, children  # tritonserver and haproxy
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not any(os.path.exists(f"/proc/{pid}") for pid in children)  # stopped and reaped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
