"""Key rotation: active/retired states, grace periods, the keys CLI, reload without restart, no key material shown."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, keyring
from rtinfer.errors import Refusal
from rtinfer.launch.server import TritonServer

from conftest import require_model


def materials(path):
    return [e["key"] for e in json.loads(path.read_text())["keys"].values()]


def test_retired_key_opens_during_grace_then_is_refused(tmp_path):
    path = keyring.write_new(tmp_path / "k.json", key_ids=("k1",))
    keyring.retire_key(path, "k1", grace_s=60, now=1000.0)
    ring = keyring.Keyring.load(path)
    assert len(ring.key("k1", now=1059.0)) == 32  # decrypt-only within grace
    with pytest.raises(Refusal) as info:
        ring.key("k1", now=1061.0)
    assert info.value.reason == "retired_key" and "grace period has ended" in str(info.value)
    with pytest.raises(keyring.KeyringError, match="no active key"):
        ring.sealing_key_id()


def test_rotate_adds_an_active_key_and_retires_the_others(tmp_path):
    path = keyring.write_new(tmp_path / "k.json", key_ids=("k1", "k2"))
    new_id, retired = keyring.rotate(path, grace_s=30)
    ring = keyring.Keyring.load(path)
    assert new_id == "k3" and sorted(retired) == ["k1", "k2"]
    assert ring.sealing_key_id() == "k3"
    states = {k: e.state for k, e in ring.entries().items()}
    assert states == {"k1": "retired", "k2": "retired", "k3": "active"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_prune_drops_only_expired_keys(tmp_path):
    path = keyring.write_new(tmp_path / "k.json", key_ids=("k1", "k2"))
    keyring.retire_key(path, "k1", grace_s=0, now=time.time() - 1)
    keyring.retire_key(path, "k2", grace_s=3600)
    assert keyring.prune(path) == ["k1"]
    assert keyring.Keyring.load(path).key_ids == ["k2"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_group_or_world_readable_keyring_refused(tmp_path, mode):
    path = keyring.write_new(tmp_path / "k.json")
    os.chmod(path, mode)
    with pytest.raises(keyring.KeyringError, match="readable by group/others.*chmod 600"):
        keyring.Keyring.load(path)


def test_malformed_keyring_errors_never_echo_material(tmp_path):
    path = tmp_path / "k.json"
    secret = base64.b64encode(os.urandom(31)).decode()  # wrong length
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps({"keys": {"k1": {"key": secret, "state": "active"}}}).encode())
    os.close(fd)
    with pytest.raises(keyring.KeyringError) as info:
        keyring.Keyring.load(path)
    assert "31 bytes" in str(info.value) and secret not in str(info.value)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rtinfer.keyring", *map(str, args)], capture_output=True, text=True)


def test_keys_cli_creates_rotates_lists_and_never_prints_material(tmp_path):
    path = tmp_path / "k.json"
    outputs = [run_cli("init", path), run_cli("add", path), run_cli("rotate", path, "--grace-s", "5"),
               run_cli("retire", path, "k1", "--grace-s", "0"), run_cli("list", path), run_cli("prune", path)]
    assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
    text = "".join(o.stdout + o.stderr for o in outputs)
    listing = outputs[4].stdout
    assert "k3\tactive" in listing and "k2\tretired" in listing and "(expired)" in listing
    assert "pruned ['k1']" in outputs[5].stdout
    for m in materials(path):
        assert m not in text
    bad = run_cli("add", path, "--key-id", "k2")
    assert bad.returncode == 2 and "already exists" in bad.stderr


def test_source_reloads_on_change_and_keeps_last_good_keys(tmp_path):
    path = keyring.write_new(tmp_path / "k.json", key_ids=("k1",))
    errors = []
    src = keyring.KeyringSource(path, check_s=0, on_error=errors.append)
    assert src.current().key_ids == ["k1"]
    keyring.add_key(path, "k2")
    assert src.current().key_ids == ["k1", "k2"] and src.reloads == 1
    os.chmod(path, 0o644)  # a botched edit: the service keeps the keys it had, and says why
    assert src.current().key_ids == ["k1", "k2"]
    assert len(errors) == 1 and "readable by group/others" in errors[0]
    assert all(m not in errors[0] for m in materials(path))


@pytest.fixture
def own_server(tmp_path):
    """A server with its own keyring and audit trail: rotating the session's keyring would change what every
    other test's server reads."""
    require_model()
    ring = keyring.write_new(tmp_path / "keys" / "keyring.json", key_ids=("k1",))
    audit_dir = tmp_path / "audit"
    with TritonServer(keyring=str(ring), audit_dir=str(audit_dir), workdir=tmp_path / "triton") as srv:
        srv.keyring_path, srv.audit_dir = ring, audit_dir
        yield srv


def test_rotation_on_a_running_server_without_restart(own_server):
    """Add k7 with the CLI: served within a few seconds; retire it with no grace: refused, audited."""
    server, keyring_path, audit_dir = own_server, own_server.keyring_path, own_server.audit_dir
    assert run_cli("add", keyring_path, "--key-id", "k7").returncode == 0
    key = keyring.Keyring.load(keyring_path).key("k7")
    c = PipelineClient(server.grpc_url, key=key, key_id="k7", client_id="rotator")
    deadline, res = time.monotonic() + 15, None
    while res is None:
        try:
            res = c.classify(samples.photo("coffee"), top_k=1)
        except InferenceServerException as exc:
            assert "authentication failed" in exc.message() and time.monotonic() < deadline, exc.message()
            time.sleep(0.3)
    assert res.predictions[0].index == 967
    assert run_cli("retire", keyring_path, "k7", "--grace-s", "0").returncode == 0
    deadline = time.monotonic() + 15
    while True:
        rid = uuid.uuid4().hex
        try:
            c.classify(samples.photo("coffee"), top_k=1, request_id=rid)
        except InferenceServerException as exc:
            assert "authentication failed" in exc.message() and "k7" not in exc.message()
            break
        assert time.monotonic() < deadline, "retired key still accepted"
        time.sleep(0.3)
    [rec] = [r for r in audit.read_records(audit_dir) if r.get("request_id") == rid]
    assert rec["event"] == "rejected" and rec["reason"] == "retired_key" and rec["key_id"] == "k7"
    text = "".join(f.read_text() for f in audit.audit_files(audit_dir))
    assert base64.b64encode(key).decode() not in text and key.hex() not in text
    c.close()


def test_internal_key_is_private_rotates_and_is_never_printed(tmp_path):
    from rtinfer import internal_key
    path = tmp_path / "server-internal.key"
    first = internal_key.load_or_create(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and internal_key.load_or_create(path) == first
    out = subprocess.run([sys.executable, "-m", "rtinfer.internal_key", "rotate", str(path)], capture_output=True,
                         text=True)
    keys = internal_key.read(path)
    assert out.returncode == 0 and len(keys) == 2 and keys[1] == first and keys[0] != first
    assert internal_key.fingerprint(keys[0]) + " (current)" in out.stdout
    assert all(k.hex() not in out.stdout and base64.b64encode(k).decode() not in out.stdout for k in keys)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    os.chmod(path, 0o640)
    with pytest.raises(PermissionError, match="chmod 600"):
        internal_key.read(path)
