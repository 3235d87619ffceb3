"""Access control and transport on a real server: API keys per API group on HTTP and gRPC, gRPC over TLS.

The CA and the server certificate are made here with cryptography's x509 API; the
server binds 127.0.0.1 on free ports and is stopped by the fixture.
"""
from __future__ import annotations

import uuid

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import access, audit
from rtinfer.access import loopback_certs as make_ca_and_server_cert
from rtinfer.launch.server import TritonServer

from conftest import require_model
from helpers import locust, records_for

API_KEY, ADMIN_KEY = "infer-7d1b3f0c", "admin-92ac55e1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_ca_and_server_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured(keyring_path, certs, tmp_path_factory):
    """The pipeline with an inference key, an admin key and gRPC over TLS."""
    require_model()
    audit_dir = tmp_path_factory.mktemp("audit-secured")
    with TritonServer(keyring=str(keyring_path), audit_dir=str(audit_dir), api_key=API_KEY, admin_key=ADMIN_KEY,
                      tls_cert=str(certs["server"]), tls_key=str(certs["server-key"]),
                      workdir=tmp_path_factory.mktemp("triton-secured")) as srv:
        srv.audit_dir = audit_dir
        yield srv


def pipeline_client(srv, keys, protocol, certs, **kw):
    url = srv.grpc_url if protocol == "grpc" else srv.http_url
    tls = {"tls_ca": str(certs["ca"])} if protocol == "grpc" else {}
    return PipelineClient(url, protocol=protocol, key=keys.key("k1"), key_id="k1", client_id=f"acl-{protocol}",
                          **tls, **kw)


def test_server_flags_use_the_grpc_header_prefix_on_the_client_side():
    assert access.headers("grpc", API_KEY) == {"triton-grpc-protocol-x-api-key": API_KEY}
    assert access.headers("http", API_KEY, ADMIN_KEY) == {"x-api-key": API_KEY, "x-admin-key": ADMIN_KEY}
    assert "--grpc-restricted-protocol=inference:x-api-key=" + API_KEY in access.server_args(API_KEY)
    with pytest.raises(ValueError):
        access.server_args("bad,key")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_inference_with_the_api_key_is_served_and_audited(secured, keys, certs, protocol):
    c = pipeline_client(secured, keys, protocol, certs, api_key=API_KEY)
    res = c.classify(samples.photo("coffee"), top_k=1)
    c.close()
    assert res.predictions[0].index == 967
    [rec] = [r for r in audit.read_records(secured.audit_dir) if r.get("request_id") == res.request_id]
    assert rec["event"] == "served"


# Triton's refusal of a request without the inference key: HTTP 403; gRPC UNAVAILABLE, the status a
# closed port or a failed TLS handshake also gets, so the message tells them apart.
KEY_REFUSAL = {"grpc": ("StatusCode.UNAVAILABLE", "This protocol is restricted, expecting header "
                                                  "'triton-grpc-protocol-x-api-key'"),
               "http": ("403", "This API is restricted, expecting header 'x-api-key'")}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("key", [None, "wrong-key", ADMIN_KEY])
def test_missing_or_wrong_api_key_is_refused(secured, keys, certs, protocol, key):
    """Refused by Triton's front end for the key, on a server that is up and reachable over the same
    channel (TLS included), before any stage: nothing audited for the request, while a request with the
    key right after it is served and audited."""
    raw = raw_client(secured, protocol, certs)
    assert raw.is_server_live() and raw.is_model_ready("pipeline")  # reachable: the refusal is the key's
    raw.close()
    c = pipeline_client(secured, keys, protocol, certs, api_key=key or "")
    rid = uuid.uuid4().hex
    with pytest.raises(InferenceServerException) as info:
        c.classify(samples.photo("coffee"), top_k=1, request_id=rid)
    c.close()
    assert (str(info.value.status()), info.value.message()) == KEY_REFUSAL[protocol]
    ok = pipeline_client(secured, keys, protocol, certs, api_key=API_KEY)
    served = ok.classify(samples.photo("coffee"), top_k=1)
    ok.close()
    assert [r["event"] for r in records_for(secured.audit_dir, served.request_id)] == ["served"]
    assert records_for(secured.audit_dir, rid) == []  # the stages never saw the refused one


def test_plain_x_api_key_header_is_not_enough_on_grpc(secured, certs):
    """Triton only checks gRPC metadata carrying its prefix; the bare HTTP header name is refused."""
    c = grpcclient.InferenceServerClient(secured.grpc_url, ssl=True, root_certificates=str(certs["ca"]))
    with pytest.raises(InferenceServerException):
        c.get_inference_statistics("pipeline", headers={"x-admin-key": ADMIN_KEY})
    c.close()


ADMIN_CALLS = {  # one call per admin API group
    "model-repository": lambda c, h: c.get_model_repository_index(headers=h),
    "statistics": lambda c, h: c.get_inference_statistics("pipeline", headers=h),
    "shared-memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
    "logging": lambda c, h: c.get_log_settings(headers=h),
}


def raw_client(srv, protocol, certs):
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(srv.grpc_url, ssl=True, root_certificates=str(certs["ca"]))
    return httpclient.InferenceServerClient(srv.http_url)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("group", list(ADMIN_CALLS))
def test_admin_apis_need_the_admin_key(secured, certs, protocol, group):
    c = raw_client(secured, protocol, certs)
    call = ADMIN_CALLS[group]
    for wrong in ({}, access.headers(protocol, api_key=API_KEY), access.headers(protocol, admin_key="nope")):
        with pytest.raises(InferenceServerException) as info:
            call(c, wrong)
        assert str(info.value.status()) in ("403", "StatusCode.UNAVAILABLE"), (group, wrong, info.value)
    assert call(c, access.headers(protocol, admin_key=ADMIN_KEY)) is not None
    c.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_health_and_metadata_stay_open(secured, certs, protocol):
    c = raw_client(secured, protocol, certs)
    assert c.is_server_live() and c.is_model_ready("pipeline")
    c.close()


def test_grpc_without_tls_is_refused(secured):
    c = grpcclient.InferenceServerClient(secured.grpc_url)
    with pytest.raises(InferenceServerException):
        c.is_server_live(client_timeout=5)
    c.close()


def test_grpc_tls_with_an_untrusted_ca_is_refused(secured, tmp_path):
    other = make_ca_and_server_cert(tmp_path)  # same names, different CA
    c = grpcclient.InferenceServerClient(secured.grpc_url, ssl=True, root_certificates=str(other["ca"]))
    with pytest.raises(InferenceServerException):
        c.is_server_live(client_timeout=5)
    c.close()


def test_classify_cli_takes_the_access_options(secured, keyring_path, certs, tmp_path, capsys):
    from clients import classify
    image = tmp_path / "coffee.jpg"
    image.write_bytes(samples.photo("coffee"))
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")
    args = [str(image), "--protocol", "grpc", "--url", secured.grpc_url, "--keyring", str(keyring_path),
            "--tls-ca", str(certs["ca"]), "--top-k", "1"]
    assert classify.main(args + ["--api-key-file", str(key_file)]) == 0
    assert "espresso" in capsys.readouterr().out
    assert classify.main(args) == 1  # no key
    assert "ERROR" in capsys.readouterr().out


def test_locustfile_takes_the_access_options(secured, keyring_path, certs, tmp_path):
    """Load tests run against a locked-down server too: API key file + gRPC TLS CA."""
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")
    access_args = ["--triton-api-key-file", str(key_file), "--triton-tls-ca", str(certs["ca"])]
    proc, rows = locust(secured, keyring_path, tmp_path / "ok", seconds=3, extra=access_args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for protocol in ("grpc", "http"):
        row = rows[(protocol, "pipeline")]
        assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, row
    proc, rows = locust(secured, keyring_path, tmp_path / "nokey", seconds=2,
                        extra=["--triton-tls-ca", str(certs["ca"])])
    assert all(int(r["Failure Count"]) == int(r["Request Count"]) > 0
               for r in rows.values() if r["Name"] != "Aggregated")
