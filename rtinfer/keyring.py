"""Keyring: AES-256 keys by key id, loaded from a JSON file only the service can read.

File format::

    {"keys": {"<key id>": {"key": "<base64 of 32 bytes>", "state": "active"}}}

``python -m rtinfer.keyring init PATH`` creates one with a fresh key (mode 0600).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import sys
from pathlib import Path

from rtinfer.errors import RejectedRequest

ENV_VAR = "RTINFER_KEYRING"
DEFAULT_KEY_ID = "k1"


class KeyringError(RuntimeError):
    """The keyring file is missing, malformed or too open; a deployment error, not a client's."""


class Keyring:
    def __init__(self, keys: dict[str, bytes]):
        self._keys = dict(keys)

    def __repr__(self) -> str:  # never show key material
        return f"Keyring(key_ids={sorted(self._keys)})"

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def key(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise RejectedRequest("unknown_key", f"unknown key id '{key_id}'") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Keyring":
        path = Path(path)
        try:
            mode = path.stat().st_mode
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise KeyringError(f"keyring file not found: {path}") from None
        except ValueError as exc:
            raise KeyringError(f"keyring file {path} is not valid JSON: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyringError(f"keyring file {path} is readable by group/others (mode {stat.S_IMODE(mode):o}); "
                               "chmod 600 it")
        keys = {}
        for key_id, entry in data.get("keys", {}).items():
            raw = base64.b64decode(entry["key"])
            if len(raw) != 32:
                raise KeyringError(f"key '{key_id}' in {path} is {len(raw)} bytes, AES-256 needs 32")
            keys[key_id] = raw
        if not keys:
            raise KeyringError(f"keyring file {path} holds no keys")
        return cls(keys)

    @classmethod
    def from_env_or(cls, path: str | None) -> "Keyring":
        path = path or os.environ.get(ENV_VAR)
        if not path:
            raise KeyringError(f"no keyring: set the model parameter 'keyring' or ${ENV_VAR}")
        return cls.load(path)


def write_new(path: str | os.PathLike, key_ids=(DEFAULT_KEY_ID,)) -> Path:
    """Create a keyring with fresh random keys, readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"keys": {k: {"key": base64.b64encode(os.urandom(32)).decode(), "state": "active"} for k in key_ids}}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
    os.chmod(path, 0o600)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtinfer.keyring")
    sub = parser.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="create a keyring if it does not exist yet")
    init.add_argument("path")
    init.add_argument("--key-id", action="append", default=None)
    init.add_argument("--force", action="store_true", help="overwrite an existing keyring")
    args = parser.parse_args(argv)
    if args.cmd == "init":
        if Path(args.path).exists() and not args.force:
            print(f"keyring exists: {args.path} ({Keyring.load(args.path)})")
            return 0
        write_new(args.path, args.key_id or [DEFAULT_KEY_ID])
        print(f"created keyring {args.path} ({Keyring.load(args.path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
