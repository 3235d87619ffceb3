"""The server-internal secret: made on first start, mode 0600, never in a model config or on a command line.

It keys what only the operator may check and no client can forge: the keyed hash
that stands in the audit for the result of a sealed response. Every stage instance
reads the same file; the first one to start creates it (atomically: a temp file
linked into place, so two instances starting together agree on one key).
``$RTINFER_INTERNAL_KEY`` names the file; by default it lives beside the keyring.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

ENV_VAR = "RTINFER_INTERNAL_KEY"
FILE_NAME = "server-internal.key"
KEY_BYTES = 32


def resolve_path(keyring_path: str | os.PathLike) -> Path:
    return Path(os.environ.get(ENV_VAR) or Path(keyring_path).with_name(FILE_NAME))


def load_or_create(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another instance was first: then its key is the key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    with open(path, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        key = fh.read()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"server-internal key {path} is readable by group/others "
                              f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if len(key) != KEY_BYTES:
        raise ValueError(f"server-internal key {path} is {len(key)} bytes, expected {KEY_BYTES}")
    return key
