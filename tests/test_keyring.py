"""Keyring loading: keys by id, unknown ids refused, open permissions refused, keys never printed."""
import os

import pytest

from rtinfer import keyring
from rtinfer.errors import RejectedRequest


def test_load_and_lookup(tmp_path):
    path = keyring.write_new(tmp_path / "k.json", key_ids=("a", "b"))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    ring = keyring.Keyring.load(path)
    assert ring.key_ids == ["a", "b"] and len(ring.key("a")) == 32
    with pytest.raises(RejectedRequest) as info:
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
