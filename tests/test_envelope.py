"""The envelope format: what seals opens, and every kind of damage is refused with its own reason."""
import os

import pytest

from rtinfer import envelope
from rtinfer.errors import Refusal

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
    with pytest.raises(Refusal) as info:
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
    forged = envelope.PREFIX.pack(envelope.MAGIC, len(forged_header)) + forged_header + nonce + body
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
    data = envelope.PREFIX.pack(envelope.MAGIC, 5) + b"{oops" + b"\0" * 40
    assert reason_of(data)[0] == "bad_format"


@pytest.mark.parametrize("header", [b'{"aud":"pipeline","cid":"\\udc80","kid":"k1","ts":1}',
                                    b'{"aud":"pipeline","cid":"c","kid":7,"ts":1}',
                                    b'{"aud":"pipeline","cid":"c","kid":"k1","ts":1.5}',
                                    b'{"aud":"pipeline","cid":"c","kid":"k1","ts":1' + b"0" * 400 + b"}"])
def test_header_fields_must_have_their_types(header):
    """Issue 14 (2): a ts of 401 digits overflowed the window check; strings must be UTF-8 encodable."""
    data = envelope.PREFIX.pack(envelope.MAGIC, len(header)) + header + b"\0" * 40
    assert reason_of(data)[0] == "bad_format"


# ---------------------------------------------------------------- ts at the edges of exact JSON integers
# docs/formats.md "Envelope format": "ts must be an integer from 0 to 2^53 - 1" (anything else is bad_format); the code
# (envelope.MAX_TS_MS) reads it as 0 <= ts < 2^53. 2^53 is where JSON numbers stop being exact for a
# reader that holds them as doubles (JavaScript, many JSON libraries): 2^53 + 1 reads as 2^53 there.
# So 2^53 is refused too: a value one reader would take for its neighbour never opens. The envelopes
# below are authentic (sealed with the key): only the ts check stands between them and being opened.

EXACT = 2 ** 53


def test_a_double_reads_2_pow_53_plus_1_as_2_pow_53():
    """Why the limit sits where it does (a property of the readers, not of this code)."""
    assert float(EXACT + 1) == float(EXACT) and float(EXACT - 1) != float(EXACT)
    header = envelope.Header("k1", "alice", "pipeline", EXACT + 1).encode()
    import json
    assert json.loads(header, parse_int=float)["ts"] == EXACT  # a double-based reader sees another timestamp


@pytest.mark.parametrize("ts", [0, 1, EXACT - 1], ids=["0", "1", "2^53-1"])
def test_ts_from_0_to_below_2_pow_53_opens(ts):
    opened = envelope.open_envelope(envelope.seal(b"image", KEY, **META, timestamp_ms=ts), opener())
    assert opened.header.timestamp_ms == ts and type(opened.header.timestamp_ms) is int
    assert opened.plaintext == b"image"


@pytest.mark.parametrize("ts", [EXACT, EXACT + 1, -1, 2 ** 63, 2 ** 64 + 1],
                         ids=["2^53", "2^53+1", "-1", "2^63", "2^64+1"])
def test_ts_at_or_above_2_pow_53_or_negative_is_bad_format(ts):
    sealed = envelope.seal(b"image", KEY, **META, timestamp_ms=ts)  # authentic: the AEAD would open it
    reason, msg = reason_of(sealed)
    assert reason == "bad_format" and "'ts'" in msg, msg
    with pytest.raises(Refusal) as info:
        envelope.parse_header(sealed)
    assert info.value.reason == "bad_format"


@pytest.mark.parametrize("ts, reason", [(0, "expired"), (EXACT - 1, "from_future"), (EXACT, "bad_format"),
                                        (EXACT + 1, "bad_format")], ids=["0", "2^53-1", "2^53", "2^53+1"])
def test_ts_edges_through_the_preprocess_stage(tmp_path, ts, reason):
    """The real stage (keyring, replay store, audit on a temp dir): 0 is a valid timestamp far outside the
    replay window (expired, not bad_format), 2^53 - 1 far in the future, 2^53 and 2^53 + 1 malformed; each
    refusal is audited with that reason and nothing is recorded as seen."""
    from rtinfer import audit, replay
    from rtinfer.errors import Refusal
    from rtinfer.keyring import Keyring
    from rtinfer.preprocess import Preprocessor, Request
    writer = audit.AuditWriter(tmp_path / "pre.jsonl")
    store = replay.ReplayGuard(tmp_path / "nonces.db")
    pre = Preprocessor(Keyring({"k1": KEY}), writer, pipelines={"pipeline"}, replay=store)
    [result] = pre.run([Request(envelope.seal(b"image", KEY, **META, timestamp_ms=ts), request_id="r")])
    writer.close()
    assert isinstance(result, Refusal) and result.reason == reason, result
    assert store.size() == 0
    store.close()
    [rec] = audit.read_records(tmp_path)
    assert rec["event"] == "rejected" and rec["reason"] == reason and rec["request_id"] == "r"
