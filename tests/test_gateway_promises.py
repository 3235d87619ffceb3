"""Gateway promises of docs/gateway.md "Limits" that no other test exercised (issue 23, section 4), against the real
HAProxy (deploy/gateway/) in front of the session's locked-down tritonserver:

- an HTTP POST to an inference route without ``Content-Length`` (chunked) gets 411;
- TLS 1.0 and 1.1 handshakes are refused (TLS 1.2+ only), by the gateway, not by our client;
- the API-key file the gateway writes holds only SHA-256 digests, mode 0600, and no key is in clear
  anywhere the gateway keeps (its files, its environment, its command line);
- the timeouts hold against slow clients: headers sent a byte at a time (30 s), a gRPC body that never
  ends (30 s), the body of a refused HTTP request (5 s);
- a repeated API-key header over gRPC is refused.

Controls sent straight to Triton, or made with the same client setup, show that each refusal is the gateway's.
"""
from __future__ import annotations

import hashlib
import http.client
import re
import socket
import ssl
import struct
import threading
import time
import uuid
import warnings

import grpc
import pytest
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import access
from rtinfer.launch.gateway import Gateway, key_digest

from conftest import GATED_API_KEY, require_haproxy
from helpers import log_after, records_for

SECOND_KEY = "gw-second-key-91c4"  # a second accepted key: the file holds one digest per key
INFER = "/inference.GRPCInferenceService/ModelInfer"


def http_infer_body(keys) -> tuple[bytes, dict]:
    """A freshly sealed pipeline request as Triton's HTTP binary protocol carries it, and its headers (no
    Content-Length: the caller decides how the body goes out)."""
    c = PipelineClient("unused:1", protocol="http", key=keys.key("k1"), key_id="k1", client_id="gw-promises")
    kwargs = c.request(c.seal(samples.photo("coffee")), 1)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        kwargs["inputs"], outputs=kwargs["outputs"], request_id=kwargs["request_id"], parameters=kwargs["parameters"])
    return body, {"Inference-Header-Content-Length": str(json_size), "Content-Type": "application/octet-stream",
                  **access.headers("http", GATED_API_KEY)}


def envelope_request(sealed: bytes, client_id: str) -> service_pb2.ModelInferRequest:
    """A gRPC ModelInfer for the pipeline, built by hand (sent with hand-made metadata)."""
    req = service_pb2.ModelInferRequest(model_name="pipeline", id=uuid.uuid4().hex)
    req.parameters["client_id"].string_param = client_id
    req.inputs.add(name="ENVELOPE", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(struct.pack("<I", len(sealed)) + sealed)
    return req


@pytest.fixture(scope="module")
def gateway(gated_triton, tmp_path_factory):
    require_haproxy()
    with Gateway.in_front_of(gated_triton, api_keys=[GATED_API_KEY, SECOND_KEY],
                             workdir=tmp_path_factory.mktemp("gw-promises")) as gw:
        yield gw


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return access.loopback_certs(tmp_path_factory.mktemp("gw-promises-tls"))


@pytest.fixture(scope="module")
def tls_gateway(gated_triton, certs, tmp_path_factory):
    require_haproxy()
    with Gateway.in_front_of(gated_triton, api_keys=[GATED_API_KEY], tls_cert=str(certs["server"]),
                             tls_key=str(certs["server-key"]),
                             workdir=tmp_path_factory.mktemp("gw-promises-tls-gw")) as gw:
        yield gw


def log_lines(gw, mark: int, pattern: str, n: int, timeout: float = 10.0) -> list[str]:
    """Access-log lines after ``mark`` matching ``pattern``, once there are ``n`` of them (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in gw.log_text()[mark:].splitlines() if re.search(pattern, ln)]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# ------------------------------------------------------------------ 411 for a chunked POST

def chunked_post(target, path: str, body: bytes, headers: dict):
    """POST with ``Transfer-Encoding: chunked`` and no ``Content-Length`` (http.client sends it so when the
    body is an iterable)."""
    conn = http.client.HTTPConnection(target.host, target.http_port, timeout=60)
    chunks = [body[i:i + 4096] for i in range(0, len(body), 4096)]
    conn.request("POST", path, body=iter(chunks), headers=headers, encode_chunked=True)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def test_chunked_post_without_content_length_gets_411(gateway, gated_triton, keys):
    path = "/v2/models/pipeline/infer"
    body, headers = http_infer_body(keys)
    assert not any(h.lower() == "content-length" for h in headers)
    # control: Triton alone serves the same chunked request (a fresh envelope: no replay)
    resp, data = chunked_post(gated_triton, path, body, headers)
    assert resp.status == 200, (resp.status, data[:300])
    body, headers = http_infer_body(keys)
    mark = len(gateway.log_text())
    resp, data = chunked_post(gateway, path, body, headers)
    assert resp.status == 411 and b"gateway: Content-Length required" in data, (resp.status, data[:300])
    assert log_after(gateway, mark, r" 411 .*refused=length_required")
    # the same request with its Content-Length is served through the gateway
    body, headers = http_infer_body(keys)
    conn = http.client.HTTPConnection(gateway.host, gateway.http_port, timeout=60)
    conn.request("POST", path, body=body, headers=headers)
    assert conn.getresponse().status == 200
    conn.close()


# ------------------------------------------------------------------ TLS 1.2+ only

OLD = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1}  # as ssl names them (1.0 is "TLSv1")


def client_context(version: ssl.TLSVersion, ca: str, alpn: str) -> ssl.SSLContext:
    """A client that can offer ``version``: OpenSSL 3 refuses TLS 1.0/1.1 (SHA-1 signatures) above
    security level 0, so the level is lowered here, on our side only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1 / TLSv1_1 are deprecated names
        ctx.minimum_version = ctx.maximum_version = version
    ctx.set_alpn_protocols([alpn])
    return ctx


def handshake(port: int, ctx: ssl.SSLContext, request: bytes | None = None) -> tuple[str, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            reply = b""
            if request:
                tls.sendall(request)
                while b"\r\n\r\n" not in reply:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            return tls.version(), reply


def tls_server_accepting_everything(certs) -> tuple[int, threading.Thread, list]:
    """A loopback TLS server (Python ssl, same certificate) that accepts TLS 1.0 to 1.3: the control that
    shows our client really offers the old versions, so a refusal comes from the other side."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs["server"]), str(certs["server-key"]))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    seen: list = []

    def serve():
        with listener:
            for _ in range(len(OLD)):
                try:
                    conn, _ = listener.accept()
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        seen.append(tls.version())
                except OSError as exc:
                    seen.append(exc)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, seen


@pytest.mark.parametrize("alpn, port_of", [("http/1.1", "http_port"), ("h2", "grpc_port")], ids=["http", "grpc"])
def test_tls_1_0_and_1_1_are_refused_by_the_gateway(tls_gateway, certs, alpn, port_of):
    port, thread, seen = tls_server_accepting_everything(certs)
    for name, version in OLD.items():
        assert handshake(port, client_context(version, str(certs["ca"]), alpn))[0] == name  # our client can
    thread.join(timeout=10)
    assert seen == list(OLD), seen
    mark = len(tls_gateway.log_text())
    for name, version in OLD.items():
        with pytest.raises(ssl.SSLError) as info:
            handshake(getattr(tls_gateway, port_of), client_context(version, str(certs["ca"]), alpn))
        # the server answered with a protocol_version alert: it refused the version we offered
        assert info.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", (name, info.value)
    assert len(log_lines(tls_gateway, mark, r"SSL handshake failure", len(OLD))) == len(OLD)
    # the same client setup with TLS 1.2 gets through (and, on HTTP, a real answer from Triton behind it)
    request = b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" if alpn == "http/1.1" else None
    version, reply = handshake(getattr(tls_gateway, port_of), client_context(ssl.TLSVersion.TLSv1_2,
                                                                               str(certs["ca"]), alpn), request)
    assert version == "TLSv1.2"
    assert request is None or reply.startswith(b"HTTP/1.1 200"), reply[:200]


# ------------------------------------------------------------------ the key file: digests only, 0600

def test_api_key_file_holds_only_sha256_digests_and_is_0600(gateway, gated_triton, keys):
    path = gateway.workdir / "api-keys.sha256"
    assert path.stat().st_mode & 0o777 == 0o600, oct(path.stat().st_mode)
    assert gateway.workdir.stat().st_mode & 0o777 == 0o700
    lines = path.read_text().splitlines()
    assert lines == [hashlib.sha256(k.encode()).hexdigest().upper() for k in (GATED_API_KEY, SECOND_KEY)]
    assert lines == [key_digest(GATED_API_KEY), key_digest(SECOND_KEY)]
    # no key in clear anywhere the gateway keeps: its files, its environment, its command line
    for key in (GATED_API_KEY, SECOND_KEY):
        for f in gateway.workdir.rglob("*"):
            if f.is_file():
                assert key.encode() not in f.read_bytes(), f
        pid = gateway.proc.pid
        for what in ("environ", "cmdline"):
            assert key.encode() not in open(f"/proc/{pid}/{what}", "rb").read(), what
    # and this file is what the gateway checks keys against: both keys are accepted, a third is not
    for key in (GATED_API_KEY, SECOND_KEY, "not-a-key"):
        # Triton behind it knows the first key only: SECOND_KEY passes the gateway and is refused by
        # Triton (403), so the gateway's own verdict is read from its log
        mark = len(gateway.log_text())
        c = PipelineClient(gateway.http_url, protocol="http", key=keys.key("k1"), key_id="k1",
                           client_id="gw-keyfile", api_key=key)
        try:
            c.classify(samples.photo("coffee"), top_k=1)
            got = 200
        except InferenceServerException as exc:
            got = int(exc.status())
        c.close()
        refused = log_after(gateway, mark, r"refused=api_key_wrong")
        if key == GATED_API_KEY:
            assert got == 200 and not refused
        elif key == SECOND_KEY:
            assert got == 403 and not refused, got  # passed the gateway; Triton's own check refused it
        else:
            assert got == 401 and refused


def test_key_files_left_with_a_wider_mode_are_narrowed_to_0600(gated_triton, certs, tmp_path):
    """`make serve` reuses build/gateway/gateway-<port>: a key file left there readable by others (an older
    version, a copy, a chmod) must not stay so. O_CREAT's 0600 applies to new files only."""
    from rtinfer.launch.process import free_port
    port = free_port()
    left = tmp_path / f"gateway-{port}"
    left.mkdir()
    for name in ("api-keys.sha256", "server.pem"):
        (left / name).write_text("left from an earlier run\n")
        (left / name).chmod(0o644)
    with Gateway.in_front_of(gated_triton, http_port=port, api_keys=[GATED_API_KEY], tls_cert=str(certs["server"]),
                             tls_key=str(certs["server-key"]), workdir=tmp_path) as gw:
        assert gw.workdir == left
        for name in ("api-keys.sha256", "server.pem"):
            assert (left / name).stat().st_mode & 0o777 == 0o600, (name, oct((left / name).stat().st_mode))
        assert (left / "api-keys.sha256").read_text() == key_digest(GATED_API_KEY) + "\n"


# ------------------------------------------------------------------ a repeated API key over gRPC

@pytest.mark.parametrize("values", [[GATED_API_KEY, GATED_API_KEY], [GATED_API_KEY, "wrong-key"],
                                    ["wrong-key", GATED_API_KEY]], ids=["same-twice", "right-wrong", "wrong-right"])
def test_repeated_api_key_header_over_grpc_is_refused(gateway, gated_triton, keys, values):
    header = access.GRPC_HEADER_PREFIX + access.API_KEY_HEADER

    def request():
        sealed = PipelineClient("unused:1", key=keys.key("k1"), key_id="k1", client_id="gw-repeat").seal(
            samples.photo("coffee"))
        return envelope_request(sealed, "gw-repeat")

    def call(target, req, metadata):
        with grpc.insecure_channel(target.grpc_url) as channel:
            return channel.unary_unary(INFER)(req.SerializeToString(), metadata=metadata, timeout=60)
    # control: the same request with the right key once is served through the gateway
    call(gateway, request(), [(header, GATED_API_KEY)])
    mark = len(gateway.log_text())
    req = request()
    with pytest.raises(grpc.RpcError) as info:
        call(gateway, req, [(header, v) for v in values])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    assert "more than one API key header" in info.value.details()
    assert log_after(gateway, mark, r" grpc .*route=ModelInfer .*refused=api_key_repeated")
    assert records_for(gated_triton.audit_dir, req.id) == []  # refused before Triton


# ------------------------------------------------------------------ slow clients are cut off (timeouts)
# haproxy.cfg: "timeout http-request 30s" (a request's headers), "wait-for-body time 30s" (a gRPC message, the
# body of an accepted HTTP inference request),
# "wait-for-body time 5s if refused" (the body of a refused HTTP request). Without them a client that keeps
# trickling would be bounded only by "timeout client 300s", an idle timeout it resets with every byte. The
# four slow clients run at once; each is given CAP_S before the test calls the promise broken.

CAP_S = 90.0


def read_until_closed(sock: socket.socket, until: float, trickle: bytes = b"") -> tuple[bytes, bool]:
    """Read what the gateway sends until it closes the connection (True) or ``until`` (False); meanwhile send
    ``trickle`` one byte every 0.5 s (a slowloris that never finishes)."""
    import select
    got, sent = b"", 0
    while time.monotonic() < until:
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent:sent + 1])
                sent += 1
            except OSError:  # the gateway closed its side
                pass
        readable, _, _ = select.select([sock], [], [], 0.5)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
    return got, False


def slow_http_headers(gw) -> tuple[bytes, bool]:
    """Headers one byte at a time, never finished."""
    with socket.create_connection((gw.host, gw.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/pipeline/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        return read_until_closed(s, time.monotonic() + CAP_S, trickle=b"X-Slow: " + b"a" * 1000)


def refused_http_body_never_finished(gw) -> tuple[bytes, bool]:
    """A request the gateway refuses (wrong key) whose body stops half-way: it is answered once the 5 s
    for its body are up, then the connection is closed."""
    with socket.create_connection((gw.host, gw.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/pipeline/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: wrong-key\r\n"
                  b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 1000)
        return read_until_closed(s, time.monotonic() + CAP_S)


def accepted_http_body_never_finished(gw) -> tuple[bytes, bool]:
    """A request the gateway accepts (right key, within the limit) whose body stops half-way: it never
    reaches a replica, and it is cut off once the 30 s for its body are up (not held until the 120 s
    server timeout)."""
    with socket.create_connection((gw.host, gw.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/pipeline/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: "
                  + GATED_API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b"{" * 1000)
        return read_until_closed(s, time.monotonic() + CAP_S)


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(name: str, value: str) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def grpc_body_never_finished(gw) -> tuple[list, bool]:
    """HTTP/2 by hand: a ModelInfer whose gRPC message announces 1000 bytes, 13 of them sent, and no
    END_STREAM. Returns the frames the gateway sent on stream 1 (and GOAWAY), and whether the stream ended."""
    with socket.create_connection((gw.host, gw.grpc_port), timeout=10) as s:
        headers = b"".join(hpack_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", INFER), (":authority", f"{gw.host}:{gw.grpc_port}"),
            ("content-type", "application/grpc"), ("te", "trailers"),
            (access.GRPC_HEADER_PREFIX + access.API_KEY_HEADER, GATED_API_KEY)))
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(SETTINGS, 0, 0)
                  + h2_frame(HEADERS, END_HEADERS, 1, headers)
                  + h2_frame(DATA, 0, 1, b"\0" + struct.pack(">I", 1000) + b"\x0a\x08pipeline" + b"\x12\x01"))
        until, buf, frames = time.monotonic() + CAP_S, b"", []
        s.settimeout(0.5)
        while time.monotonic() < until:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return frames, bool(frames)
            buf += chunk
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                length, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload, buf = buf[9:9 + length], buf[9 + length:]
                if kind == SETTINGS and not flags & ACK:
                    s.sendall(h2_frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    s.sendall(h2_frame(PING, ACK, 0, payload))
                elif stream == 1 or kind == GOAWAY:
                    frames.append((kind, flags))
                    if kind in (RST_STREAM, GOAWAY) or flags & END_STREAM:
                        return frames, True
        return frames, False


def test_slow_clients_are_cut_off(gateway, gated_triton):
    mark = len(gateway.log_text())
    probes = {"headers": slow_http_headers, "refused_body": refused_http_body_never_finished,
              "accepted_body": accepted_http_body_never_finished, "grpc_body": grpc_body_never_finished}
    results: dict = {}
    threads = [threading.Thread(target=lambda n=n, f=f: results.__setitem__(n, f(gateway))) for n, f in probes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=CAP_S + 30)
    assert set(results) == set(probes), results

    # HAProxy answers 408 when a timeout for the request ran out, and its log has the time the request took
    # (%Ta, ms: its own timer), which says WHICH timeout fired: 30 s for headers and a gRPC message, 5 s for
    # the body of a refused request, not the 300 s client timeout that a trickle keeps resetting.
    def logged(pattern: str) -> int:
        deadline = time.monotonic() + 10  # HAProxy writes the line when the transaction ends, just after the reply
        while True:
            log = gateway.log_text()[mark:]
            found = re.search(r" (\d+) \d+ (\d+) " + pattern, log)
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert found and found.group(1) == "408", (pattern, log[-2000:])
        return int(found.group(2))

    reply, closed = results["headers"]  # headers one byte at a time, never finished
    assert closed and reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert 30_000 <= logged(r'"<BADREQ>"') < 60_000
    # a request refused at the gateway whose body stops half-way: cut off once its 5 s are up (a body that
    # arrives gets the refusal itself: test_gateway_tls, a refused large request gets its answer)
    reply, closed = results["refused_body"]
    assert closed and reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert 5_000 <= logged(r'"POST /v2/models/pipeline/infer HTTP/1.1" .*refused=api_key_wrong') < 30_000
    # an accepted request whose body stops half-way: cut off after its 30 s, never forwarded (no replica)
    reply, closed = results["accepted_body"]
    assert closed and reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert 30_000 <= logged(r'"POST /v2/models/pipeline/infer HTTP/1.1" .*refused=- replica=<NOSRV>') < 60_000
    # a gRPC message that never ends: the stream is answered (HTTP 408, END_STREAM) and nothing is forwarded
    frames, ended = results["grpc_body"]
    assert ended and (HEADERS, END_HEADERS) in frames and frames[-1][1] & END_STREAM, frames
    assert 30_000 <= logged(r'"POST \S+/inference.GRPCInferenceService/ModelInfer HTTP/2.0" route=ModelInfer') < 60_000
    # the gateway still serves (nothing was left holding it)
    conn = http.client.HTTPConnection(gateway.host, gateway.http_port, timeout=10)
    conn.request("GET", "/v2/health/live")
    assert conn.getresponse().status == 200
    conn.close()
