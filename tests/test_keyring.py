"""Keyring loading: keys by id, unknown ids refused, open permissions refused, keys never printed."""
import json
import os
import subprocess
import sys

import pytest

from rtinfer import keyring
from rtinfer.errors import NOT_AUTHENTICATED, Refusal


def test_load_and_lookup(tmp_path):
    path = keyring.write_new(tmp_path / "k.json", key_ids=("a", "b"))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    ring = keyring.Keyring.load(path)
    assert ring.key_ids == ["a", "b"] and len(ring.key("a")) == 32
    with pytest.raises(Refusal) as info:
        ring.key("zzz")
    assert info.value.reason == "unknown_key"
    assert "key'" not in repr(ring) and ring.key("a").hex() not in repr(ring)


def test_world_readable_refused(tmp_path):
    path = keyring.write_new(tmp_path / "k.json")
    os.chmod(path, 0o644)
    with pytest.raises(keyring.KeyringError, match="chmod 600"):
        keyring.Keyring.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(keyring.KeyringError, match="not found"):
        keyring.Keyring.load(tmp_path / "nope.json")


def _write_raw(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, text.encode())
    os.close(fd)


@pytest.mark.parametrize("text", [
    '{"keys": ["k1"]}',                      # valid JSON, wrong shape (raised AttributeError before)
    '[' * 100_000 + ']' * 100_000,           # deep nesting
    '{"keys": {"k1": "not an object"}}',
    '{"keys": {"k1": {"key": "%s", "state": "retired", "retired_at": 1, "grace_s": NaN}}}',
    '{"keys": {"k1": {"key": "%s", "created": -5}}}',
    '{"keys": {}}',
])
def test_a_reload_of_any_bad_file_keeps_the_previous_keys(tmp_path, text):
    """Issue 14 (8): the whole file is validated before it replaces the keys; nothing raises."""
    path = keyring.write_new(tmp_path / "k.json", key_ids=("k1",))
    material = json.loads(path.read_text())["keys"]["k1"]["key"]
    errors = []
    src = keyring.KeyringSource(path, check_s=0, on_error=errors.append)
    _write_raw(path, text.replace("%s", material) + " " * 3)  # another size: seen as a change
    assert src.current().key_ids == ["k1"] and len(src.current().key("k1")) == 32
    assert len(errors) == 1 and "keeping the previous keys" in errors[0] and material not in errors[0]
    with pytest.raises(keyring.KeyringError):
        keyring.Keyring.load(path)


@pytest.mark.parametrize("grace", ["nan", "inf", "-1", "-inf"])
def test_cli_refuses_non_finite_or_negative_grace(tmp_path, grace):
    """Issue 14 (8): `retire --grace-s nan` was accepted: the key never expired and `list` crashed."""
    path = keyring.write_new(tmp_path / "k.json", key_ids=("k1", "k2"))
    before = path.read_bytes()
    for cmd in (["retire", path, "k1"], ["rotate", path]):
        out = subprocess.run([sys.executable, "-m", "rtinfer.keyring", *map(str, cmd), f"--grace-s={grace}"],
                             capture_output=True, text=True)
        assert out.returncode == 2 and "number of seconds" in out.stderr, out.stderr
        assert path.read_bytes() == before
    with pytest.raises(keyring.KeyringError, match="grace_s"):
        keyring.retire_key(path, "k1", grace_s=float(grace))
    listing = subprocess.run([sys.executable, "-m", "rtinfer.keyring", "list", str(path)], capture_output=True,
                             text=True)
    assert listing.returncode == 0 and "k1\tactive" in listing.stdout


def test_unknown_and_retired_key_ids_are_not_told_to_the_client(tmp_path):
    path = keyring.write_new(tmp_path / "k.json", key_ids=("k1",))
    keyring.retire_key(path, "k1", grace_s=0, now=1.0)
    ring = keyring.Keyring.load(path)
    for kid, reason in (("k1", "retired_key"), ("nope", "unknown_key")):
        with pytest.raises(Refusal) as info:
            ring.key(kid)
        assert info.value.reason == reason and kid in str(info.value)  # the detail, for the audit
        assert info.value.public == NOT_AUTHENTICATED  # the same for both, for the client
