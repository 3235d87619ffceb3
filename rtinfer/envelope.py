"""Sealed envelope for an image payload (AES-256-GCM).

Layout (all integers big-endian)::

    magic   4  b"RTE1"
    hlen    2  length of the header
    header  hlen  canonical JSON: {"aud": pipeline, "cid": client id, "kid": key id, "ts": unix ms}
                  a request that wants its result sealed adds "sr": 1 (authenticated, so no proxy can drop it);
                  a sealed response adds "typ": "res" and "rq": SHA-256 (hex) of the request envelope
    nonce   12 random
    body    ciphertext || 16-byte GCM tag

The associated data is magic + hlen + header, so key id, client id, target
pipeline and timestamp are authenticated: changing any of them fails decryption.
A response is bound to the exact request it answers (``rq``) and cannot be fed
back as a request (``typ``): the server seals results with the client's own key.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rtinfer.errors import NOT_AUTHENTICATED, Refusal

MAGIC = b"RTE1"
NONCE_LEN = 12
TAG_LEN = 16
PREFIX = struct.Struct(">4sH")  # MAGIC, then the header's length in bytes (big-endian): an envelope's first 6 bytes
_PREFIX = PREFIX  # the old name, for callers that still use it
REQUEST, RESPONSE = "req", "res"
MIN_LEN = PREFIX.size + 2 + NONCE_LEN + TAG_LEN  # smallest header is "{}"
MAX_TS_MS = 1 << 53  # timestamps are exact integers in every JSON reader, and fit SQLite and floats


@dataclass(frozen=True)
class Header:
    key_id: str
    client_id: str
    pipeline: str
    timestamp_ms: int
    kind: str = REQUEST
    request_sha256: str = ""  # responses only: which request envelope this answers
    seal_response: bool = False  # requests only: the client wants the result sealed to its key

    def encode(self) -> bytes:
        body = {"aud": self.pipeline, "cid": self.client_id, "kid": self.key_id, "ts": self.timestamp_ms}
        if self.seal_response:
            body["sr"] = 1
        if self.kind != REQUEST:
            body.update(typ=self.kind, rq=self.request_sha256)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Opened:
    header: Header
    nonce: bytes
    plaintext: bytes


def seal(plaintext: bytes, key: bytes, *, key_id: str, client_id: str, pipeline: str,
         timestamp_ms: int | None = None, nonce: bytes | None = None, seal_response: bool = False) -> bytes:
    """Encrypt ``plaintext`` for ``pipeline``; a fresh random nonce unless one is given (tests).
    ``seal_response``: the server must answer with the result sealed to ``key`` (it is in the
    authenticated header, so nobody on the way can turn it off)."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return _seal_header(plaintext, key, Header(key_id, client_id, pipeline, ts, seal_response=seal_response), nonce)


def seal_response(plaintext: bytes, key: bytes, *, key_id: str, client_id: str, pipeline: str,
                  request_sha256: str) -> bytes:
    """Seal a result to the request's key and client, bound to that exact request envelope (its SHA-256)."""
    header = Header(key_id, client_id, pipeline, int(time.time() * 1000), RESPONSE, request_sha256)
    return _seal_header(plaintext, key, header, None)


def open_response(sealed: bytes, key: bytes, request_envelope: bytes) -> Opened:
    """Client side: open a sealed result and check it answers ``request_envelope``."""
    opened = open_envelope(sealed, lambda header: key)
    if opened.header.kind != RESPONSE or opened.header.request_sha256 != hashlib.sha256(request_envelope).hexdigest():
        raise Refusal("wrong_response", "sealed response does not answer this request")
    return opened


def _seal_header(plaintext: bytes, key: bytes, hdr: Header, nonce: bytes | None) -> bytes:
    header = hdr.encode()
    aad = PREFIX.pack(MAGIC, len(header)) + header
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    return aad + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def parse_header(envelope: bytes) -> tuple[Header, bytes, bytes, bytes]:
    """Split an envelope into (header, aad, nonce, body) without decrypting."""
    if len(envelope) < MIN_LEN:
        raise Refusal("truncated", f"envelope truncated: {len(envelope)} bytes, at least {MIN_LEN} needed")
    magic, hlen = PREFIX.unpack_from(envelope)
    if magic != MAGIC:
        raise Refusal("bad_format", "not an RTE1 envelope (bad magic bytes)")
    start = PREFIX.size
    if len(envelope) < start + hlen + NONCE_LEN + TAG_LEN:
        raise Refusal("truncated", f"envelope truncated: header says {hlen} header bytes, "
                              f"but only {len(envelope)} bytes in all")
    try:
        fields = json.loads(envelope[start:start + hlen])
        ts = fields["ts"]
        if type(ts) is not int or not 0 <= ts < MAX_TS_MS:
            raise ValueError("ts")
        for name in ("kid", "cid", "aud", "typ", "rq"):
            if name in fields and (not isinstance(fields[name], str) or not _utf8(fields[name])):
                raise ValueError(name)
        header = Header(key_id=fields["kid"], client_id=fields["cid"],
                        pipeline=fields["aud"], timestamp_ms=ts,
                        kind=str(fields.get("typ", REQUEST)), request_sha256=str(fields.get("rq", "")),
                        seal_response=fields.get("sr") == 1)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        raise Refusal("bad_format", "envelope header is not valid: it needs string 'kid', 'cid', 'aud' "
                              "and an integer 'ts' (unix ms, 0 to 2^53 - 1)") from None
    aad = envelope[:start + hlen]
    nonce = envelope[start + hlen:start + hlen + NONCE_LEN]
    return header, aad, nonce, envelope[start + hlen + NONCE_LEN:]


def _utf8(text: str) -> bool:
    """False for strings UTF-8 cannot hold (lone surrogates from JSON escapes)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def open_envelope(envelope: bytes, key_for) -> Opened:
    """Authenticate and decrypt; ``key_for(header)`` returns the AES key or raises Refusal."""
    header, aad, nonce, body = parse_header(envelope)
    key = key_for(header)
    try:
        plaintext = AESGCM(key).decrypt(nonce, body, aad)
    except InvalidTag:
        raise Refusal("auth_failed", f"authentication failed for key id '{header.key_id}': "
                              "ciphertext, header or key do not match", public=NOT_AUTHENTICATED) from None
    return Opened(header, nonce, plaintext)
