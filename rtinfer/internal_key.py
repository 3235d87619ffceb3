"""The server-internal secret: made on first start, mode 0600, never in a model config or on a command line.

It MACs the audit context preprocess hands postprocess (``rtinfer.audit_context``)
and keys the hash that stands in the audit for the result of a sealed response.
Every stage instance reads the same file; the first one to start creates it
(atomically: a temp file linked into place, so instances starting together agree).
``$RTINFER_INTERNAL_KEY`` names the file; by default it lives beside the keyring.

The file is 32 bytes per key, the current key first, then the previous one, which
is still accepted for checking (so contexts in flight across a rotation still
verify). ``python -m rtinfer.internal_key rotate|show [PATH]`` rotates like the
keyring: an atomic rename, and the stages reload the file when it changes.

Rotation (issue 20): each stage instance reloads on its own schedule (``check_s``),
so preprocess may sign with the new key before postprocess has read it. A checker
therefore reads the file again, once, before it calls a context forged
(``InternalKeys.all(fresh=True)``): good requests in that window are served, a
forgery is still refused. Procedure: run ``rotate`` on the server host (no restart);
rotate again only after the contexts' freshness window (``audit_ctx_max_age_s``,
60 s) has passed, since a context made under a key two rotations old is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
from pathlib import Path

from rtinfer.keyring import read_private
from rtinfer.reloading import ReloadingFile

ENV_VAR = "RTINFER_INTERNAL_KEY"
FILE_NAME = "server-internal.key"
KEY_BYTES = 32
KEEP = 2  # the current key and the previous one


def resolve_path(keyring_path: str | os.PathLike) -> Path:
    return Path(os.environ.get(ENV_VAR) or Path(keyring_path).with_name(FILE_NAME))


def fingerprint(key: bytes) -> str:
    return hashlib.sha256(b"rtinfer-internal-key\0" + key).hexdigest()[:16]


def _write_new(path: Path, keys: list[bytes]) -> Path:
    """Write ``keys`` to a temp file (0600) and link or rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"".join(keys))
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def read(path: str | os.PathLike) -> list[bytes]:
    """The keys, current first; the file must exist, be 0600 and hold whole keys."""
    path = Path(path)
    data = read_private(path, "server-internal key")
    if not data or len(data) % KEY_BYTES:
        raise ValueError(f"server-internal key {path} is {len(data)} bytes, not a multiple of {KEY_BYTES}")
    return [data[i:i + KEY_BYTES] for i in range(0, len(data), KEY_BYTES)]


def load_or_create(path: str | os.PathLike) -> bytes:
    """The current key, creating the file with a fresh one if there is none."""
    return load_all(path)[0]


def load_all(path: str | os.PathLike) -> list[bytes]:
    path = Path(path)
    if not path.exists():
        tmp = _write_new(path, [os.urandom(KEY_BYTES)])
        try:
            os.link(tmp, path)  # fails if another instance was first: then its key is the key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return read(path)


def rotate(path: str | os.PathLike) -> list[bytes]:
    """A new current key; the previous current one stays accepted for checking."""
    path = Path(path)
    keys = ([os.urandom(KEY_BYTES)] + load_all(path))[:KEEP]
    os.replace(_write_new(path, keys), path)
    return keys


class InternalKeys:
    """The keys of the file, reloaded when it changes (checked at most every ``check_s``; ``rtinfer.reloading``);
    a reload that fails keeps the keys it had."""

    def __init__(self, path: str | os.PathLike, *, check_s: float = 1.0):
        self.path = Path(path)
        load_all(self.path)  # made on first start
        self._file = ReloadingFile(self.path, read, check_s=check_s, on_error=_not_reloaded)

    def all(self, *, fresh: bool = False) -> list[bytes]:
        """The keys, current first; ``fresh``: look at the file now, whenever it was last looked at (a
        checker whose MAC did not check: the signer may have reloaded a rotated file first)."""
        return self._file.get(fresh=fresh)

    @property
    def current(self) -> bytes:
        return self.all()[0]

    def __repr__(self) -> str:  # never show key material
        return f"InternalKeys({self.path}, {[fingerprint(k) for k in self._file.value]})"


def _not_reloaded(exc: Exception) -> None:
    why = exc if isinstance(exc, (OSError, ValueError)) else type(exc).__name__
    print(f"rtinfer.internal_key: not reloaded, keeping the previous keys: {why}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtinfer.internal_key", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, what in (("rotate", "make a new current key; the previous one stays accepted"),
                       ("show", "fingerprints of the keys, current first (never key material)")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("path", nargs="?", help=f"default: ${ENV_VAR}, else build/keys/{FILE_NAME}")
    args = p.parse_args(argv)
    path = Path(args.path or os.environ.get(ENV_VAR) or Path("build/keys") / FILE_NAME)
    keys = rotate(path) if args.cmd == "rotate" else load_all(path)
    print(f"{path}: " + ", ".join(f"{fingerprint(k)}{' (current)' if i == 0 else ''}" for i, k in enumerate(keys)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
