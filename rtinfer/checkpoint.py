"""Signed audit checkpoints: Ed25519 signatures over a chain's head.

The hash chain shows that nothing changed *relative to itself*; someone who can
rewrite the whole file can also recompute every hash. A checkpoint record carries
a signature over (chain name, seq, head hash) made with a key the payload keys
have nothing to do with, held only by the service. A rewritten history then fails
at the first checkpoint after the change: the forger cannot sign its new head.
Records after the last checkpoint are unsigned until the next one (the writer
signs on an interval, at rotation and at close), and dropping the tail of a file
cannot be seen from the file alone: ship the checkpoints elsewhere for that.

``python -m rtinfer.checkpoint keygen PATH`` writes PATH (private, PEM, 0600) and PATH.pub.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rtinfer.keyring import read_private

ENV_VAR = "RTINFER_AUDIT_SIGNING_KEY"


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def fingerprint(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    def __init__(self, private: Ed25519PrivateKey):
        self._key = private
        self.public = private.public_key()
        self.key_id = fingerprint(self.public)

    def __repr__(self) -> str:  # never show key material
        return f"Signer(key_id={self.key_id})"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Signer":
        path = Path(path)
        key = serialization.load_pem_private_key(read_private(path, "audit signing key"), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def checkpoint(self, chain: str, seq: int, head: str, time_iso: str, chains: list[str] | None = None,
                   replica: str | None = None, fleet: list[str] | None = None) -> dict:
        """The body of a checkpoint record covering record ``seq`` whose hash is ``head``; ``chains``:
        the chains present beside it, so a verifier notices one that was deleted whole; ``replica``: the
        fleet replica it belongs to; ``fleet``: the replicas of the fleet, so a fleet verifier notices a
        replica whose whole directory was deleted."""
        signed = {"chain": chain, "seq": seq, "head": head, "time": time_iso}
        if chains is not None:
            signed["chains"] = list(chains)
        if replica is not None:
            signed["replica"] = replica
        if fleet is not None:
            signed["fleet"] = list(fleet)
        return {"event": "checkpoint", "checkpoint": signed, "signer": self.key_id,
                "sig": base64.b64encode(self._key.sign(_canonical(signed))).decode()}


def load_public(path: str | os.PathLike) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def check(record: dict, public: Ed25519PublicKey) -> str:
    """'' when the checkpoint record's signature is valid, else why not."""
    try:
        signed = record["checkpoint"]
        public.verify(base64.b64decode(record["sig"]), _canonical(signed))
    except InvalidSignature:
        return "checkpoint signature is not valid for this public key (forged or re-signed history)"
    except (KeyError, TypeError, ValueError):
        return "checkpoint record is malformed"
    return ""


def keygen(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtinfer.checkpoint")
    sub = p.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="create an Ed25519 audit signing key (PATH, 0600) and PATH.pub")
    kg.add_argument("path")
    args = p.parse_args(argv)
    if Path(args.path).exists():
        print(f"signing key exists: {args.path}")
        return 0
    priv, pub = keygen(args.path)
    print(f"created audit signing key {priv} (public key {pub}, id {Signer.load(priv).key_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
