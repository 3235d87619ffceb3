"""TLS at the gateway, on HTTP and gRPC (Triton's own HTTP endpoint has none), and mutual TLS.

Certificates come from a throwaway CA (rtinfer.access.loopback_certs); the gateway fronts the
session's locked-down Triton on loopback.
"""
from __future__ import annotations

import re
import ssl

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from geventhttpclient.response import HTTPConnectionClosed
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import access
from rtinfer.access import loopback_certs as make_ca_and_server_cert, pem_key
from rtinfer.launch.gateway import Gateway

from conftest import GATED_API_KEY, require_haproxy
from helpers import CATS, log_after, records_for

PROTOCOLS = ["grpc", "http"]


def make_client_ca_and_cert(directory):
    """A client CA (for the gateway's TLS_CLIENT_CA) and a client certificate it signed."""
    ca, ca_key = access.throwaway_ca("rtinfer client CA")
    cert, key = access.issue(ca, ca_key, "gateway test client",
                             (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False))
    paths = {name: directory / f"{name}.pem" for name in ("client-ca", "client", "client-key")}
    paths["client-ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["client"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["client-key"].write_bytes(pem_key(key))
    paths["client-key"].chmod(0o600)
    return paths


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gw-tls")
    return {**make_ca_and_server_cert(directory), **make_client_ca_and_cert(directory)}


@pytest.fixture(scope="module")
def tls_gateway(gated_triton, certs, tmp_path_factory):
    require_haproxy()
    with Gateway.in_front_of(gated_triton, api_keys=[GATED_API_KEY], tls_cert=str(certs["server"]),
                             tls_key=str(certs["server-key"]), workdir=tmp_path_factory.mktemp("gw-tls")) as gw:
        yield gw


@pytest.fixture(scope="module")
def mtls_gateway(gated_triton, certs, tmp_path_factory):
    require_haproxy()
    with Gateway.in_front_of(gated_triton, api_keys=[GATED_API_KEY], tls_cert=str(certs["server"]),
                             tls_key=str(certs["server-key"]), tls_client_ca=str(certs["client-ca"]),
                             workdir=tmp_path_factory.mktemp("gw-mtls")) as gw:
        yield gw


def url(gw, protocol):
    return gw.grpc_url if protocol == "grpc" else gw.http_url


def client(gw, keys, protocol, **kw):
    return PipelineClient(url(gw, protocol), protocol=protocol, key=keys.key("k1"), key_id="k1",
                          client_id=f"tls-{protocol}", **{"api_key": GATED_API_KEY, **kw})


def raw_client(gw, protocol, **tls):
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(gw.grpc_url, **access.grpc_tls_kwargs(**tls))
    return httpclient.InferenceServerClient(gw.http_url, **access.http_tls_kwargs(**tls))


# How each refusal reaches the client (measured with the tritonclient versions pinned here). gRPC reports
# every transport failure as UNAVAILABLE, a closed port too ("Connection refused"), so its message says which.
REFUSED = {  # case -> (HTTP exception, gRPC message pattern)
    "plaintext": (HTTPConnectionClosed, r"Socket closed|Connection reset"),  # the TLS port drops the bytes
    "untrusted": (ssl.SSLCertVerificationError, r"[Hh]andshake failed"),  # the client rejects the certificate
    # TLS 1.3: the handshake completes, then the gateway's "certificate required" alert ends the connection
    "no client certificate": ((ssl.SSLError, r"CERTIFICATE_REQUIRED"),
                              r"CERTIFICATE_REQUIRED|TSI_DATA_CORRUPTED|Socket closed|Connection reset"),
}


def expect_refused(c, protocol, case):
    """``c.is_server_live()`` fails the way ``case`` must (REFUSED), not as a closed port or a bug would."""
    http_error, grpc_pattern = REFUSED[case]
    if protocol == "grpc":
        with pytest.raises(InferenceServerException) as info:
            c.is_server_live(client_timeout=5)
        assert str(info.value.status()) == "StatusCode.UNAVAILABLE", info.value
        assert re.search(grpc_pattern, info.value.message()), info.value.message()
    else:
        error, pattern = http_error if isinstance(http_error, tuple) else (http_error, None)
        with pytest.raises(error, match=pattern):
            c.is_server_live()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pipeline_over_tls(tls_gateway, gated_triton, keys, certs, protocol):
    c = client(tls_gateway, keys, protocol, tls_ca=str(certs["ca"]))
    res = c.classify(samples.photo("chelsea"), top_k=3)
    c.close()
    assert res.predictions[0].index in CATS
    [rec] = records_for(gated_triton.audit_dir, res.request_id)
    assert rec["event"] == "served"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_composing_models_refused_over_tls(tls_gateway, keys, certs, protocol):
    c = client(tls_gateway, keys, protocol, tls_ca=str(certs["ca"]), pipeline="preprocess")
    with pytest.raises(InferenceServerException) as info:
        c.classify(samples.photo("chelsea"), top_k=1)
    c.close()
    assert str(info.value.status()) in ("403", "StatusCode.PERMISSION_DENIED"), info.value


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_key_over_tls_refused_and_logged(tls_gateway, keys, certs, protocol):
    mark = len(tls_gateway.log_text())
    c = client(tls_gateway, keys, protocol, tls_ca=str(certs["ca"]), api_key="not-the-key")
    with pytest.raises(InferenceServerException) as info:
        c.classify(samples.photo("coffee"), top_k=1)
    c.close()
    assert str(info.value.status()) in ("401", "StatusCode.UNAUTHENTICATED"), info.value
    # "~" after the frontend name: the request came over TLS
    assert log_after(tls_gateway, mark, rf" {protocol}~ .*refused=api_key_wrong")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_refused_large_request_gets_its_answer_not_a_closed_connection(tls_gateway, keys, certs, protocol):
    """The gateway answers a refusal once the body is in: a client still sending 6 MiB over TLS
    reads the 401, not an EOF."""
    c = client(tls_gateway, keys, protocol, tls_ca=str(certs["ca"]), api_key="not-the-key")
    kwargs = c.request(b"\0" * (6 * 1024 * 1024), 1)
    for _ in range(3):
        with pytest.raises(InferenceServerException) as info:
            c.client.infer(**kwargs)
        assert str(info.value.status()) in ("401", "StatusCode.UNAUTHENTICATED"), info.value
    c.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plaintext_to_the_tls_ports_is_refused(tls_gateway, protocol):
    c = raw_client(tls_gateway, protocol)
    expect_refused(c, protocol, "plaintext")
    c.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_untrusted_certificate_is_refused_by_the_client(tls_gateway, tmp_path, protocol):
    other = make_ca_and_server_cert(tmp_path)  # same names, another CA
    c = raw_client(tls_gateway, protocol, ca=str(other["ca"]))
    expect_refused(c, protocol, "untrusted")
    c.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mutual_tls_needs_a_client_certificate(mtls_gateway, keys, certs, protocol):
    anonymous = raw_client(mtls_gateway, protocol, ca=str(certs["ca"]))
    expect_refused(anonymous, protocol, "no client certificate")
    anonymous.close()
    c = client(mtls_gateway, keys, protocol, tls_ca=str(certs["ca"]), tls_cert=str(certs["client"]),
               tls_key=str(certs["client-key"]))
    assert c.classify(samples.photo("coffee"), top_k=1).predictions[0].index == 967
    c.close()
