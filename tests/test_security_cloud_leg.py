"""The cascade's cloud leg (issue 20): never plaintext to the cloud, hostname checked, breaker never wedged,
and the loopback TLS key never readable by others.

The cloud's API key travels in the gRPC headers of every escalation: over a plaintext channel anyone on
the path reads it, and can also force ``edge_fallback`` at will. So a ``cloud_url`` without a CA refuses
to load, unless ``cloud_insecure_loopback_only`` is "1" and the host is a loopback address. Real
tritonservers on loopback, real TLS.
"""
from __future__ import annotations

import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rtinfer import access, keyring, routing
from rtinfer.cloud_leg import CloudLeg
from rtinfer.launch.process import free_port
from rtinfer.launch.server import TritonServer, repository_with

from conftest import require_model

API_KEY = "cloud-infer-20a4"
SERVICE_KEY_ID = "edge-svc"


# --- 1. no plaintext to the cloud -------------------------------------------------------------------

def leg(url: str, tmp_path, tls_ca=None, **kw) -> CloudLeg:
    return CloudLeg(url, key=bytes(32), key_id=SERVICE_KEY_ID, client_id="edge", api_key=API_KEY,
                    tls_ca=tls_ca, **kw)


def test_cloud_leg_without_a_ca_is_refused(tmp_path):
    with pytest.raises(ValueError, match="TLS settings missing for cloud_url 127.0.0.1:8001"):
        leg("127.0.0.1:8001", tmp_path)


@pytest.mark.parametrize("url", ["10.1.2.3:8001", "cloud.example.com:8001", "localhost.example.com:8001",
                                 "0.0.0.0:8001", "[::]:8001", "[2001:db8::1]:8001", "dns:///127.0.0.1:8001",
                                 "127.0.0.1.nip.io:8001", "127.0.0.1", "localhost:8001"])
def test_the_loopback_opt_out_is_refused_for_any_other_host(tmp_path, url):
    with pytest.raises(ValueError, match="TLS settings missing for cloud_url.*only for a loopback"):
        leg(url, tmp_path, insecure_loopback_only=True)


@pytest.mark.parametrize("url", ["127.0.0.1:8001", "127.3.2.1:8001", "[::1]:8001"])
def test_the_loopback_opt_out_allows_plaintext_on_loopback_only(tmp_path, url):
    leg(url, tmp_path, insecure_loopback_only=True).close()


@pytest.mark.parametrize("value", ["", "0", "1"])
def test_the_opt_out_flag_takes_0_or_1(value):
    assert access.flag("cloud_insecure_loopback_only", value) is (value == "1")


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_the_opt_out_flag_refuses_other_values(value):
    with pytest.raises(ValueError, match="cloud_insecure_loopback_only must be"):
        access.flag("cloud_insecure_loopback_only", value)


def test_a_missing_ca_file_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="cloud_tls_ca .*nope.pem"):
        leg("127.0.0.1:8001", tmp_path, tls_ca=str(tmp_path / "nope.pem"))


@pytest.fixture(scope="module")
def edge_setup(tmp_path_factory, keyring_path):
    require_model()
    d = tmp_path_factory.mktemp("edge-no-tls")
    ring = keyring.write_new(d / "service-keyring.json", key_ids=(SERVICE_KEY_ID,))
    (d / "cloud-api-key").write_text(API_KEY + "\n")
    (d / "cloud-api-key").chmod(0o600)
    return {"dir": d, "ring": ring, "client_ring": keyring_path}


def edge_repo(setup, name: str, **params):
    cloud = {"cloud_url": f"127.0.0.1:{free_port()}", "cloud_pipeline": "cascade",
             "cloud_keyring": str(setup["ring"]), "cloud_key_id": SERVICE_KEY_ID,
             "cloud_api_key_file": str(setup["dir"] / "cloud-api-key"), **params}
    return repository_with(setup["dir"] / name, {"cascade": cloud})


def start_edge(setup, repo, name):
    return TritonServer(repo, models=("cascade",), keyring=str(setup["client_ring"]),
                        audit_dir=str(setup["dir"] / f"audit-{name}"), workdir=setup["dir"] / f"triton-{name}")


@pytest.mark.parametrize("name, params", [
    ("no-ca", {}),
    ("opt-out-remote", {"cloud_url": "10.1.2.3:8001", "cloud_insecure_loopback_only": "1"}),
])
def test_an_edge_without_tls_to_its_cloud_does_not_load(edge_setup, name, params):
    """Through a real tritonserver: the cascade's initialize fails and the server log says why."""
    server = start_edge(edge_setup, edge_repo(edge_setup, name, **params), name)
    with pytest.raises(RuntimeError, match="tritonserver exited") as info:
        server.start(timeout=120)
    server.stop()
    assert "TLS settings missing for cloud_url" in str(info.value), str(info.value)


def test_an_edge_with_the_loopback_opt_out_loads_and_says_so(edge_setup):
    server = start_edge(edge_setup, edge_repo(edge_setup, "opt-out-loopback", cloud_insecure_loopback_only="1"),
                        "opt-out-loopback")
    with server:
        pass
    warned = [line for line in server.log_file.read_text(errors="replace").splitlines() if "PLAINTEXT" in line]
    assert warned and "loopback development only" in warned[0], server.log_tail()


def test_a_certificate_for_another_hostname_is_refused(tmp_path):
    """The CA is trusted but its certificate names only ``localhost``: gRPC checks the name it dialled, so
    127.0.0.1 is refused (nothing overrides the target name) while localhost, same server, passes TLS."""
    require_model()
    ca, ca_key = access.throwaway_ca("hostname test CA")
    cert, key = access.issue(ca, ca_key, "localhost",
                             (x509.SubjectAlternativeName([x509.DNSName("localhost")]), False),
                             (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server-key.pem").write_bytes(access.pem_key(key))
    (tmp_path / "server-key.pem").chmod(0o600)
    with TritonServer(models=("classifier_onnx",), api_key=API_KEY, tls_cert=str(tmp_path / "server.pem"),
                      tls_key=str(tmp_path / "server-key.pem"), workdir=tmp_path / "triton") as cloud:
        wrong = leg(f"127.0.0.1:{cloud.grpc_port}", tmp_path, tls_ca=str(tmp_path / "ca.pem"), deadline_s=5,
                    attempts=1)
        assert wrong.ask(b"image", "wrong-name") is None
        assert "hostname verification" in wrong.last_errors[-1].lower(), wrong.last_errors
        assert "cascade" not in wrong.last_errors[-1]  # refused at the handshake, the server never saw it
        wrong.close()
        right = leg(f"localhost:{cloud.grpc_port}", tmp_path, tls_ca=str(tmp_path / "ca.pem"))
        assert right.client.is_server_live(headers=right.headers)
        right.close()


# --- 2. a spent deadline does not wedge the breaker half-open ------------------------------------------

def test_a_spent_deadline_does_not_take_the_half_open_trial(tmp_path):
    """An escalation whose deadline is already spent makes no call: it must leave the breaker's single
    half-open trial for the next escalation, or the breaker never calls the cloud again."""
    now = [0.0]
    clock = lambda: now[0]
    certs = access.loopback_certs(tmp_path)
    breaker = routing.Breaker(failures=1, reset_s=5.0, clock=clock)
    cloud = leg(f"127.0.0.1:{free_port()}", tmp_path, tls_ca=str(certs["ca"]), deadline_s=0.01,
                min_attempt_s=0.05, attempts=1, breaker=breaker, clock=clock)
    breaker.failure()
    assert breaker.state == "open"
    now[0] += 6.0  # the half-open trial is due
    assert cloud.ask(b"image", "spent") is None  # less than min_attempt_s left: no call
    cloud.deadline_s = 5.0
    assert cloud.ask(b"image", "next") is None  # nobody listens there: but the cloud was asked
    assert cloud.last_errors[-1] != "breaker open", cloud.last_errors
    assert [s for _, s in breaker.transitions] == ["open", "half_open", "open"]
    now[0] += 6.0
    assert breaker.allow()  # the next trial again
    breaker.success()
    assert breaker.state == "closed"
    cloud.close()


# --- 3. the loopback TLS key is never readable by others ---------------------------------------------

def _no_chmod(*args, **kwargs):
    raise AssertionError("chmod after the write: the key was readable by others until then")


def test_loopback_key_is_created_0600_even_with_umask_0(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "chmod", _no_chmod)
    old = os.umask(0)
    try:
        paths = access.loopback_certs(tmp_path / "tls")
    finally:
        os.umask(old)
    assert stat.S_IMODE(paths["server-key"].stat().st_mode) == 0o600
    assert serialization.load_pem_private_key(paths["server-key"].read_bytes(), None)


def test_an_existing_loopback_key_with_a_wide_mode_is_narrowed_before_the_write(tmp_path, monkeypatch):
    (tmp_path / "tls").mkdir()
    old_key = tmp_path / "tls" / "server-key.pem"
    old_key.write_bytes(b"old")
    old_key.chmod(0o644)
    monkeypatch.setattr(os, "chmod", _no_chmod)
    paths = access.loopback_certs(tmp_path / "tls")
    assert stat.S_IMODE(paths["server-key"].stat().st_mode) == 0o600
    assert paths["server-key"].read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
