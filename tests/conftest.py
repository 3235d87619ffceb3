"""Shared fixtures: keys, and one real tritonserver per test session on free loopback ports.

``model_repository_with`` (``rtinfer.launch.server.repository_with``) builds a copy of the repository for servers
that need other stage parameters (rotation size, replay window, ...): the stages are copied with their
``parameters`` changed, every other model is a symlink to the real one.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from rtinfer import checkpoint, keyring
# model_repository_with: tests import it from here
from rtinfer.launch.server import ROOT, TritonServer, repository_with as model_repository_with  # noqa: F401

REPO = ROOT / "model_repository"


def settled(read, timeout: float = 10.0):
    """``read()`` once two reads 0.1 s apart agree (or at ``timeout``): postprocess and the cascade export
    their metrics after they have answered, so a scrape right after an answer may come too early."""
    last, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == last:
            break
        last = now
    return last


def require_model():
    if not (REPO / "classifier_onnx" / "1" / "model.onnx").exists():
        pytest.fail("the CPU model is not built: run `make engines` (make test does it first)")


BOUND_KEY_ID, BOUND_CLIENTS = "bound-key", ("acme", "acme-batch")


@pytest.fixture(scope="session")
def keyring_path(tmp_path_factory) -> Path:
    """k1, k2 have no client list (as keyrings written before it: any id that no key lists); BOUND_KEY_ID may
    claim only BOUND_CLIENTS (rtinfer.keyring). Written first, it is never the newest key."""
    return keyring.write_new(tmp_path_factory.mktemp("keys") / "keyring.json", key_ids=(BOUND_KEY_ID, "k1", "k2"),
                             clients={BOUND_KEY_ID: BOUND_CLIENTS})


@pytest.fixture(scope="session")
def keys(keyring_path) -> keyring.Keyring:
    return keyring.Keyring.load(keyring_path)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory) -> tuple[Path, Path]:
    """Ed25519 audit signing key (private, public)."""
    return checkpoint.keygen(tmp_path_factory.mktemp("signing") / "audit-signing.pem")


@pytest.fixture(scope="session")
def audit_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="session")
def server(keyring_path, audit_dir, signing_key, tmp_path_factory):
    """The pipeline on the embedded server; stopped at the end of the session."""
    require_model()
    work = tmp_path_factory.mktemp("triton")
    with TritonServer(keyring=str(keyring_path), audit_dir=str(audit_dir), audit_signing_key=str(signing_key[0]),
                      workdir=work) as srv:
        yield srv


GATED_API_KEY, GATED_ADMIN_KEY = "gw-infer-5c0e91aa", "gw-admin-3b7d20f4"


def require_haproxy():
    from rtinfer.launch.gateway import GatewayUnavailable, haproxy_binary
    try:
        haproxy_binary()
    except GatewayUnavailable as exc:  # make test installs it first (make haproxy): a failure, not a skip
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def gated_triton(keyring_path, signing_key, tmp_path_factory):
    """The pipeline on loopback, locked down as behind the gateway (inference and admin keys),
    with its own audit directory (``.audit_dir``); the gateway tests put gateways in front of it."""
    require_model()
    audit_dir = tmp_path_factory.mktemp("audit-gated")
    with TritonServer(keyring=str(keyring_path), audit_dir=str(audit_dir), audit_signing_key=str(signing_key[0]),
                      api_key=GATED_API_KEY, admin_key=GATED_ADMIN_KEY,
                      workdir=tmp_path_factory.mktemp("triton-gated")) as srv:
        srv.audit_dir = audit_dir
        yield srv
