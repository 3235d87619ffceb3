"""The envelope format: what seals opens, and every kind of damage is refused with its own reason."""
import os

import pytest

from rtinfer import envelope
from rtinfer.errors import RejectedRequest

KEY, OTHER = os.urandom(32), os.urandom(32)
META = dict(key_id="k1", client_id="alice", pipeline="pipeline")


def opener(key=KEY):
    return lambda header: key


def test_round_trip():
    sealed = envelope.seal(b"image bytes", KEY, **META, timestamp_ms=1234)
    opened = envelope.open_envelope(sealed, opener())
    assert opened.plaintext == b"image bytes"
    assert opened.header == envelope.Header("k1", "alice", "pipeline", 1234)


def test_fresh_nonce_each_time():
    a, b = (envelope.seal(b"x", KEY, **META, timestamp_ms=1) for _ in range(2))
    assert a != b


def reason_of(data, key=KEY):
    with pytest.raises(RejectedRequest) as info:
        envelope.open_envelope(data, opener(key))
    return info.value.reason, str(info.value)


def test_tampered_ciphertext():
    sealed = bytearray(envelope.seal(b"image bytes", KEY, **META))
    sealed[-20] ^= 1
    assert reason_of(bytes(sealed))[0] == "auth_failed"


def test_wrong_key():
    reason, msg = reason_of(envelope.seal(b"image", KEY, **META), key=OTHER)
    assert reason == "auth_failed" and "k1" in msg


@pytest.mark.parametrize("field,value", [("cid", "mallory"), ("aud", "pipeline_x"), ("kid", "k2"), ("ts", 99)])
def test_header_is_authenticated(field, value):
    """Rewriting key id, client id, audience or timestamp (the associated data) breaks authentication."""
    sealed = envelope.seal(b"image", KEY, **META, timestamp_ms=42)
    header, _, nonce, body = envelope.parse_header(sealed)
    fields = {"kid": header.key_id, "cid": header.client_id, "aud": header.pipeline, "ts": header.timestamp_ms}
    fields[field] = value
    forged_header = envelope.Header(fields["kid"], fields["cid"], fields["aud"], fields["ts"]).encode()
    forged = envelope._PREFIX.pack(envelope.MAGIC, len(forged_header)) + forged_header + nonce + body
    assert reason_of(forged)[0] == "auth_failed"


@pytest.mark.parametrize("cut", [0, 5, 20, -17])
def test_truncated(cut):
    sealed = envelope.seal(b"image", KEY, **META)
    reason, msg = reason_of(sealed[:cut])
    assert reason in ("truncated", "auth_failed"), msg
    if cut >= 0:
        assert reason == "truncated" and "truncated" in msg


def test_not_an_envelope():
    assert reason_of(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)[0] == "bad_format"


def test_garbage_header():
    data = envelope._PREFIX.pack(envelope.MAGIC, 5) + b"{oops" + b"\0" * 40
    assert reason_of(data)[0] == "bad_format"


@pytest.mark.parametrize("header", [b'{"aud":"pipeline","cid":"\\udc80","kid":"k1","ts":1}',
                                    b'{"aud":"pipeline","cid":"c","kid":7,"ts":1}',
                                    b'{"aud":"pipeline","cid":"c","kid":"k1","ts":1.5}',
                                    b'{"aud":"pipeline","cid":"c","kid":"k1","ts":1' + b"0" * 400 + b"}"])
def test_header_fields_must_have_their_types(header):
    """Issue 14 (2): a ts of 401 digits overflowed the window check; strings must be UTF-8 encodable."""
    data = envelope._PREFIX.pack(envelope.MAGIC, len(header)) + header + b"\0" * 40
    assert reason_of(data)[0] == "bad_format"
