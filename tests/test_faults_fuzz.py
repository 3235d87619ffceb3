"""Fuzzing the envelope parser, the stage and the image decoder (hypothesis, bounded in examples and time).

The property: whatever the bytes, the result is a value or a Refusal (a clean
per-request INVALID_ARG), never another exception (which would fail a whole batch).
"""
from __future__ import annotations

import io
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from rtinfer import audit, envelope, imaging, keyring
from rtinfer.errors import Refusal
from rtinfer.preprocess import Accepted, Preprocessor, Request

KEY = os.urandom(32)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
pytestmark = pytest.mark.timeout(120)


def _img(fmt, size=(24, 16), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, 77).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_img("PNG"), _img("JPEG"), _img("PNG", mode="L"), _img("PNG", mode="RGBA"), _img("PNG", mode="P"),
         _img("PNG", mode="I;16"), _img("JPEG", mode="CMYK"), _img("PNG", mode="1")]
VALID = envelope.seal(SEEDS[0], KEY, key_id="k1", client_id="fuzz", pipeline="pipeline")


def opener(header):
    return KEY


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for pos, op, val in edits:
        if not b:
            b.append(val)
            continue
        i = pos % len(b)
        if op == 0:
            b[i] ^= val or 1
        elif op == 1:
            del b[i:i + val % 64 + 1]
        else:
            b[i:i] = bytes([val]) * (val % 16 + 1)
    return bytes(b)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 2), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_escape_as_another_exception(data):
    with pytest.raises(Refusal):
        envelope.open_envelope(data, opener)


@FUZZ
@given(edits)
def test_mutated_envelopes_are_refused_cleanly(ed):
    data = mutate(VALID, ed)
    try:
        opened = envelope.open_envelope(data, opener)
    except Refusal:
        return
    assert opened.plaintext == SEEDS[0]  # only an equivalent envelope may open (e.g. a no-op edit)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                 st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
                                  ["kid", "cid", "aud", "ts", "typ", "rq"]), c, max_size=6), max_leaves=12)
                 .map(lambda v: __import__("json").dumps(v).encode())))
def test_any_header_is_refused_cleanly(header):
    data = struct.pack(">4sH", envelope.MAGIC, len(header)) + header + os.urandom(12 + 16 + 4)
    with pytest.raises(Refusal):
        envelope.open_envelope(data, opener)


@FUZZ
@given(st.sampled_from(SEEDS), edits)
def test_image_decoder_on_mutated_images(seed, ed):
    try:
        x = imaging.preprocess(mutate(seed, ed), max_pixels=1_000_000)
    except Refusal:
        return
    assert x.shape == (224, 224, 3) and x.dtype == np.uint8


SEALED, MUTATED, RANDOM = "sealed seed", "mutated envelope", "random bytes"


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.one_of(st.tuples(st.just(RANDOM), st.binary(max_size=512)),
                          st.tuples(st.just(MUTATED), edits.map(lambda e: mutate(VALID, e))),
                          st.tuples(st.just(SEALED), st.sampled_from(SEEDS).map(
                              lambda s: envelope.seal(s, KEY, key_id="k1", client_id="fuzz", pipeline="pipeline")))),
                min_size=1, max_size=6))
def test_preprocess_stage_answers_every_request_of_a_batch(batch):
    """A batch of valid envelopes (each seed image, freshly sealed), mutated ones and random bytes, through
    the stage with a real keyring and audit writer (a temporary directory per example): every valid one is
    accepted as its image, every other answered alone (refused, or accepted only as VALID's own image),
    every refusal audited under its request id, and the chain verifies."""
    with tempfile.TemporaryDirectory() as d:
        writer = audit.AuditWriter(Path(d) / "preprocess_0.jsonl")
        pre = Preprocessor(keyring.Keyring({"k1": KEY}), writer, pipelines={"pipeline"}, max_pixels=1_000_000)
        out = pre.run([Request(data, f"r{i}", client_id="fuzz") for i, (_, data) in enumerate(batch)])
        writer.close()
        assert len(out) == len(batch)
        refused = {}
        for i, ((kind, data), r) in enumerate(zip(batch, out)):
            if kind == SEALED:
                assert isinstance(r, Accepted), (i, r)  # a valid seed is never refused
                assert r.image.shape == (224, 224, 3) and r.image.dtype == np.uint8
            elif kind == RANDOM:
                assert isinstance(r, Refusal), (i, r)
            else:
                assert isinstance(r, (Accepted, Refusal)), (i, r)
                if isinstance(r, Accepted):  # only an equivalent envelope may open (a no-op edit)
                    assert envelope.open_envelope(data, opener).plaintext == SEEDS[0]
            if isinstance(r, Refusal):
                refused[f"r{i}"] = r.reason
        records = audit.read_records(d)
        assert {rec["request_id"]: rec["reason"] for rec in records} == refused
        assert all(rec["event"] == "rejected" for rec in records)
        assert audit.verify_file(Path(d) / "preprocess_0.jsonl").ok
