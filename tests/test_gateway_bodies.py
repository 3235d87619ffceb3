"""Hostile bodies and paths through the real gateway, in front of the real tritonserver.

- The reported bypass (a second model name behind a 5-byte tag) is refused, with and without TLS;
  straight to Triton the same bytes reach the composing model (the control).
- Compressed bodies are refused on every route (HTTP Content-Encoding, gRPC grpc-encoding), and so
  is an oversized message to a method that needs none; Triton's memory stays flat.
- HTTP paths: for generated variants of the exposed routes, whatever the gateway forwards is
  answered by Triton for an exposed model (Triton names the model it routed to in its answer); what
  the gateway answers itself (config and metadata from its stripped snapshot) is a GET and has no
  parameters.
"""
from __future__ import annotations

import random
import re
import zlib

import grpc
import pytest

from clients import samples
from clients.classify import PipelineClient
from rtinfer import access
from rtinfer.launch.gateway import Gateway
from rtinfer.launch.server import ROOT

from conftest import GATED_API_KEY, require_haproxy
from grpc_cases import field_bytes
from test_gateway import envelope_request, http_send, log_after, raw_infer, raw_refusal
from test_security_access import make_ca_and_server_cert

ATTACK_PREFIX = b"\x0a\x08pipeline" + b"\x8a\x80\x80\x80\x10" + b"\x0apreprocess"
SERVICE = "/inference.GRPCInferenceService/"
MODELS = sorted(p.name for p in (ROOT / "model_repository").iterdir() if (p / "config.pbtxt").exists())


@pytest.fixture(scope="module")
def gateway(gated_triton, tmp_path_factory):
    require_haproxy()
    with Gateway.in_front_of(gated_triton, api_keys=[GATED_API_KEY], workdir=tmp_path_factory.mktemp("gw")) as gw:
        yield gw


@pytest.fixture(scope="module")
def tls(gated_triton, tmp_path_factory):
    require_haproxy()
    certs = make_ca_and_server_cert(tmp_path_factory.mktemp("gw-tls-certs"))
    with Gateway.in_front_of(gated_triton, api_keys=[GATED_API_KEY], tls_cert=str(certs["server"]),
                             tls_key=str(certs["server-key"]), workdir=tmp_path_factory.mktemp("gw-tls")) as gw:
        yield gw, certs


def sealed_request_for(model: str, keys) -> bytes:
    """An ordinary request for ``model`` (one sealed envelope), serialized."""
    sealed = PipelineClient("unused:1", key=keys.key("k1"), key_id="k1", client_id="gw-raw").seal(
        samples.photo("chelsea"))
    return envelope_request(model, sealed, "gw-raw").SerializeToString()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


# ------------------------------------------------------------------ the reported bypass

def test_control_the_hidden_name_reaches_preprocess_straight_to_triton(gated_triton, keys):
    reply = raw_infer(gated_triton.grpc_url, ATTACK_PREFIX + sealed_request_for("preprocess", keys))
    assert reply.model_name == "preprocess"
    assert {o.name for o in reply.outputs} >= {"IMAGE", "AUDIT_CTX"}  # the decrypted image, unaudited


def test_the_hidden_name_is_refused_at_the_gateway(gateway, keys):
    mark = len(gateway.log_text())
    err = raw_refusal(gateway.grpc_url, ATTACK_PREFIX + sealed_request_for("preprocess", keys))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed gRPC message" in err.details(), err
    assert log_after(gateway, mark, r"route=ModelInfer model=pipeline refused=malformed_message")


def test_the_hidden_name_is_refused_at_the_gateway_over_tls(tls, keys):
    gw, certs = tls
    creds = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
    with grpc.secure_channel(gw.grpc_url, creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(SERVICE + "ModelInfer")(
                ATTACK_PREFIX + sealed_request_for("preprocess", keys),
                metadata=list(access.headers("grpc", GATED_API_KEY).items()), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value


# ------------------------------------------------------------------ compressed and oversized bodies

def gzip_of_zeros(mib: int, wbits: int = 31) -> bytes:
    """gzip (wbits 31) or zlib/deflate (15) of ``mib`` MiB of zeros, made without holding them."""
    z = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = b"\0" * (1 << 20)
    return b"".join(z.compress(chunk) for _ in range(mib)) + z.flush()


def http_infer_headers(**extra) -> dict:
    return {"Content-Type": "application/json", **access.headers("http", GATED_API_KEY), **extra}


def test_control_triton_inflates_a_gzip_request_body(gated_triton):
    """What the gateway closes: Triton's HTTP front end inflates the body before it parses it."""
    body = zlib.compress(b'{"inputs":[]}', 9, wbits=31)
    resp, data = http_send(gated_triton, "POST", "/v2/models/pipeline/infer", body,
                           http_infer_headers(**{"Content-Encoding": "gzip"}))
    assert resp.status == 400 and b"expected 1 inputs but got 0" in data, data  # parsed: it was inflated


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP", "br", "identity, gzip"])
def test_compressed_http_bodies_are_refused(gateway, gated_triton, encoding):
    bomb = gzip_of_zeros(200, 15 if encoding == "deflate" else 31)  # about 200 KB, 200 MiB inflated
    before = rss_kib(gated_triton.proc.pid)
    mark = len(gateway.log_text())
    resp, data = http_send(gateway, "POST", "/v2/models/pipeline/infer", bomb,
                           http_infer_headers(**{"Content-Encoding": encoding}))
    assert resp.status == 415 and b"compressed requests are not accepted" in data, (resp.status, data[:200])
    assert log_after(gateway, mark, r"refused=compressed")
    assert rss_kib(gated_triton.proc.pid) - before < 50 * 1024  # Triton never saw it


def test_identity_encoding_is_served(gateway):
    resp, data = http_send(gateway, "POST", "/v2/models/pipeline/infer", b'{"inputs":[]}',
                           http_infer_headers(**{"Content-Encoding": "identity"}))
    assert resp.status == 400 and b"expected 1 inputs but got 0" in data, data  # reached Triton


def test_a_compressed_body_on_a_get_route_is_refused(gateway):
    resp, data = http_send(gateway, "GET", "/v2/health/ready", None, {"Content-Encoding": "gzip"})
    assert resp.status == 415, (resp.status, data)


def unknown_field_of(n_bytes: int) -> bytes:
    """A valid ServerLiveRequest carrying one unknown length-delimited field of n_bytes zeros."""
    return field_bytes(100, 2, b"\0" * n_bytes)


def grpc_call(target_url: str, method: str, body: bytes, **kw):
    with grpc.insecure_channel(target_url, options=[("grpc.max_send_message_length", -1)]) as channel:
        return channel.unary_unary(SERVICE + method)(body, timeout=60, **kw)


def test_control_triton_inflates_a_compressed_server_live(gated_triton):
    assert grpc_call(gated_triton.grpc_url, "ServerLive", unknown_field_of(1 << 20),
                     compression=grpc.Compression.Gzip) == b"\x08\x01"  # live: true


@pytest.mark.parametrize("method", ["ServerLive", "ServerReady", "ServerMetadata", "ModelInfer"])
def test_compressed_grpc_messages_are_refused_on_every_method(gateway, gated_triton, method):
    before = rss_kib(gated_triton.proc.pid)
    mark = len(gateway.log_text())
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(gateway.grpc_url, method, unknown_field_of(64 << 20), compression=grpc.Compression.Gzip,
                  metadata=list(access.headers("grpc", GATED_API_KEY).items()))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "compressed" in info.value.details(), info.value
    assert log_after(gateway, mark, rf"route={method} .*refused=compressed")
    assert rss_kib(gated_triton.proc.pid) - before < 50 * 1024


def test_an_oversized_server_live_is_refused(gateway, gated_triton):
    """The open methods' messages are empty; 12 MiB is refused, not forwarded."""
    before = rss_kib(gated_triton.proc.pid)
    mark = len(gateway.log_text())
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(gateway.grpc_url, "ServerLive", unknown_field_of(12 << 20))
    # refused while the client is still sending: the status, or the stream reset under it
    assert info.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                                 grpc.StatusCode.UNAVAILABLE), info.value
    assert log_after(gateway, mark, r"route=ServerLive .*refused=(too_large|incomplete_message)")
    assert rss_kib(gated_triton.proc.pid) - before < 50 * 1024


@pytest.mark.parametrize("method", ["ServerLive", "ServerReady", "ServerMetadata"])
def test_open_methods_take_only_an_empty_message(gateway, method):
    assert grpc_call(gateway.grpc_url, method, b"") is not None
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(gateway.grpc_url, method, unknown_field_of(16))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value


# ------------------------------------------------------------------ HTTP paths against Triton's routing

def path_variants(seed: int, n: int) -> list[str]:
    """Variants of the model routes: encodings, dot segments, doubled slashes, case, versions, tails."""
    rng = random.Random(seed)
    prefixes = ["/v2", "//v2", "/./v2", "/x/../v2", "/V2", "/%76%32", "/v2/.", "/v2%2F"]
    models = ["models", "%6dodels", "Models", "models/.", "models/"]
    names = ["pipeline", "preprocess", "classifier_onnx", "postprocess", "%70ipeline", "%70reprocess",
             "pipeline/../preprocess", "preprocess/../pipeline", "pipeline%2F..%2Fpreprocess", "pipeline%00",
             "pipeline;x", "pipeline%20", "pipeline.", "PIPELINE", "Pipeline", "pipeline/.", "./preprocess",
             "pipeline%2e%2e", "%2e%2e/preprocess", "pipeline/%2e%2e/preprocess"]
    versions = ["", "", "/versions/1", "/versions/01", "/versions/%31", "/versions/-1", "/versions/1/../2",
                "/versions/", "/versions/1/"]
    tails = ["", "/infer", "/ready", "/config", "/stats", "/trace/setting", "/generate", "/infer/",
             "/%69nfer", "/infer/../config", "/config/../../preprocess/infer", "/./infer"]
    queries = ["", "", "?x=1", "?model=preprocess", ";x"]
    def pick(options):  # the plain form half the time: one odd component at a time matters most
        return options[0] if rng.random() < 0.5 else rng.choice(options)

    out = {f"/v2/models/{m}{v}{t}" for m in ("pipeline", "preprocess", "classifier_onnx", "postprocess")
           for v in ("", "/versions/1") for t in ("", "/infer", "/ready", "/config", "/stats")}
    while len(out) < n:
        path = (pick(prefixes) + "/" + pick(models) + "/" + rng.choice(names) + pick(versions)
                + rng.choice(tails) + pick(queries))
        if rng.random() < 0.3:  # percent-encode one unreserved character, or flip its case
            i = rng.randrange(1, len(path))
            if path[i].isalnum():
                path = path[:i] + (f"%{ord(path[i]):02X}" if rng.random() < 0.5 else path[i].swapcase()) + path[i + 1:]
        out.add(path)
    return sorted(out)


def named_models(data: bytes) -> set[str]:
    """The models Triton's answer names: metadata/config ("name"), errors ("model 'x'"), statistics."""
    text = data.decode(errors="replace")
    found = set(re.findall(r"""(?:model:? |"name":")'?([^'"]+)['"]""", text))
    return {m for m in found if m in MODELS}


def test_http_paths_the_gateway_forwards_are_routed_by_triton_to_exposed_models(gateway, gated_triton):
    variants = path_variants(20261206, 300)
    reached_others, forwarded, violations = 0, 0, []
    snapshot = {line.split("\t", 1)[1].encode() for line in gateway.docs_file.read_text().splitlines()}
    answered_here = 0
    for path in variants:
        for method, body in (("GET", None), ("POST", b'{"inputs":[]}')):
            headers = http_infer_headers() if body else access.headers("http", GATED_API_KEY)
            resp, data = http_send(gated_triton, method, path, body, headers)
            if named_models(data) - {"pipeline"}:
                reached_others += 1  # the control: this path reaches another model straight to Triton
            resp, data = http_send(gateway, method, path, body, headers)
            if data.startswith(b'{"error":"gateway:'):
                continue
            if data in snapshot:  # the gateway's own answer: nothing reached Triton
                answered_here += 1
                if method != "GET" or b'"parameters"' in data:
                    violations.append((method, path, resp.status, data[:120]))
                continue
            forwarded += 1
            named = named_models(data)
            if named - {"pipeline"} or b"model_stats" in data or (resp.status == 200 and method == "GET"
                                                                  and not data and "/ready" not in path
                                                                  and "/health" not in path):
                violations.append((method, path, resp.status, data[:120]))
    assert not violations, violations[:5]
    assert forwarded > 10 and reached_others > 10 and answered_here > 10, (forwarded, reached_others, answered_here)
