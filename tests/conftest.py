"""Shared fixtures: a keyring, and one real tritonserver per test session on free loopback ports."""
from __future__ import annotations

from pathlib import Path

import pytest

from rtinfer import keyring
from rtinfer.server import ROOT, TritonServer


@pytest.fixture(scope="session")
def keyring_path(tmp_path_factory) -> Path:
    return keyring.write_new(tmp_path_factory.mktemp("keys") / "keyring.json", key_ids=("k1", "k2"))


@pytest.fixture(scope="session")
def keys(keyring_path) -> keyring.Keyring:
    return keyring.Keyring.load(keyring_path)


@pytest.fixture(scope="session")
def audit_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="session")
def server(keyring_path, audit_dir, tmp_path_factory):
    """The pipeline on the embedded server; stopped at the end of the session."""
    if not (ROOT / "model_repository" / "classifier_onnx" / "1" / "model.onnx").exists():
        pytest.fail("the CPU model is not built: run `make engines` (make test does it first)")
    work = tmp_path_factory.mktemp("triton")
    with TritonServer(keyring=str(keyring_path), audit_dir=str(audit_dir), workdir=work) as srv:
        yield srv
