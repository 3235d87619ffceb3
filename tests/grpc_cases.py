"""Generated gRPC request bodies for the gateway's differential test (seeded, reproducible).

``cases(seed, n)`` yields ``(mutator, rpc, body)``: valid requests serialized by protobuf, and the
same requests after one or more mutations named for what they do to the wire format. Each mutator
aims at a way two protobuf readers can disagree (tags, lengths, varints, wire types, unknown
fields, strings, nesting, truncation, random bit damage).
"""
from __future__ import annotations

import random
import struct

from tritonclient.grpc import service_pb2

ALLOWED = ("pipeline", "cascade")
NAMES = ALLOWED + ("preprocess", "classifier_onnx", "classifier_big", "postprocess", "pipeline_int8", "",
                   "Pipeline", "pipeline\x00", "pipelinex", "pípeline", "cascade/../preprocess", "\u202epipeline")
MODEL_FIELDS = {4, 5, 6}  # ModelInferRequest fields holding messages: parameters, inputs, outputs
BAD_UTF8 = [b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80",
            b"\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"pipe\xc3line", b"\xc3\xa9\xc3"]
GOOD_UTF8 = [b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xed\x9f\xbf", b"\xee\x80\x80", b"\xf4\x8f\xbf\xbf"]


# ---------------------------------------------------------------- wire format

def varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def padded_varint(v: int, n: int) -> bytes:
    """v in exactly n bytes (n >= its shortest form): a non-minimal encoding."""
    out = bytearray()
    for i in range(n):
        b = (v >> (7 * i)) & 0x7F
        out.append(b | (0x80 if i < n - 1 else 0))
    return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint((field << 3) | wire)


def read_varint(b: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        c = b[i]
        v |= (c & 0x7F) << shift
        i += 1
        if c < 0x80:
            return v, i
        shift += 7


def split(body: bytes) -> list[tuple[int, int, bytes]]:
    """Top-level fields of a well-formed message: (field, wire, value bytes as encoded after the tag,
    the length prefix excluded for wire type 2)."""
    out, i = [], 0
    while i < len(body):
        key, i = read_varint(body, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, j = read_varint(body, i)
            out.append((field, wire, body[i:j]))
            i = j
        elif wire == 1:
            out.append((field, wire, body[i:i + 8]))
            i += 8
        elif wire == 5:
            out.append((field, wire, body[i:i + 4]))
            i += 4
        elif wire == 2:
            n, i = read_varint(body, i)
            out.append((field, wire, body[i:i + n]))
            i += n
        else:
            raise ValueError("not a well-formed message")
    return out


def field_bytes(field: int, wire: int, value: bytes) -> bytes:
    if wire == 2:
        return tag(field, 2) + varint(len(value)) + value
    return tag(field, wire) + value


def join(fields) -> bytes:
    return b"".join(field_bytes(*f) for f in fields)


# ---------------------------------------------------------------- valid requests

def random_string(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz_0123456789-" + "éß€😀\u202e\x00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def fill_parameters(rng: random.Random, params) -> None:
    for _ in range(rng.randint(0, 3)):
        p = params[random_string(rng)]
        choice = rng.randrange(5)
        if choice == 0:
            p.bool_param = rng.random() < 0.5
        elif choice == 1:
            p.int64_param = rng.randint(-(1 << 63), (1 << 63) - 1)
        elif choice == 2:
            p.string_param = random_string(rng)
        elif choice == 3:
            p.double_param = rng.uniform(-1e9, 1e9)
        else:
            p.uint64_param = rng.randint(0, (1 << 64) - 1)


def pick_name(rng: random.Random) -> str:
    """An exposed model more often than not: a mutation matters most on a message that would pass."""
    return rng.choice(ALLOWED) if rng.random() < 0.6 else rng.choice(NAMES)


def valid_infer(rng: random.Random, name: str | None = None) -> bytes:
    req = service_pb2.ModelInferRequest(model_name=pick_name(rng) if name is None else name)
    if rng.random() < 0.5:
        req.model_version = rng.choice(["", "1", "2", "01"])
    if rng.random() < 0.7:
        req.id = random_string(rng)
    fill_parameters(rng, req.parameters)
    for _ in range(rng.randint(0, 2)):
        inp = req.inputs.add(name=rng.choice(["ENVELOPE", "input", random_string(rng)]),
                             datatype=rng.choice(["BYTES", "UINT8", "FP32", "INT64"]),
                             shape=[rng.randint(-2, 1 << 40) for _ in range(rng.randint(0, 4))])
        fill_parameters(rng, inp.parameters)
        if rng.random() < 0.4:
            c = inp.contents
            c.int_contents.extend(rng.randint(-(1 << 31), (1 << 31) - 1) for _ in range(rng.randint(0, 3)))
            c.int64_contents.extend(rng.randint(-(1 << 63), (1 << 63) - 1) for _ in range(rng.randint(0, 3)))
            c.uint_contents.extend(rng.randint(0, (1 << 32) - 1) for _ in range(rng.randint(0, 2)))
            c.uint64_contents.extend(rng.randint(0, (1 << 64) - 1) for _ in range(rng.randint(0, 2)))
            c.bool_contents.extend(rng.random() < 0.5 for _ in range(rng.randint(0, 2)))
            c.fp32_contents.extend(rng.uniform(-1, 1) for _ in range(rng.randint(0, 2)))
            c.fp64_contents.extend(rng.uniform(-1, 1) for _ in range(rng.randint(0, 2)))
            c.bytes_contents.extend(rng.randbytes(rng.randint(0, 8)) for _ in range(rng.randint(0, 2)))
    for _ in range(rng.randint(0, 2)):
        out = req.outputs.add(name=rng.choice(["PROBS", "AUDIT_REF", random_string(rng)]))
        fill_parameters(rng, out.parameters)
    for _ in range(rng.randint(0, 2)):
        data = rng.randbytes(rng.randint(0, 64))
        req.raw_input_contents.append(struct.pack("<I", len(data)) + data)
    return req.SerializeToString(deterministic=rng.random() < 0.5)


def valid_config(rng: random.Random, name: str | None = None) -> bytes:
    req = service_pb2.ModelConfigRequest(name=pick_name(rng) if name is None else name,
                                         version=rng.choice(["", "1"]))
    return req.SerializeToString()


# ---------------------------------------------------------------- mutators
# Each takes (rng, body) and returns new bytes; the body is well-formed on the way in.

def hidden_name_long_tag(rng, body):
    """The reported bypass: field 1 behind a 5-byte tag whose high bits protobuf drops (and longer ones)."""
    name = rng.choice(NAMES).encode()
    key = (1 << 3) | 2
    n = rng.choice([5, 5, 5, 6, 10])
    raw = bytearray(padded_varint(key, n))
    if n == 5:
        raw[4] |= rng.randrange(1, 8) << 4  # bits 32-34
    else:
        raw[-1] |= rng.randrange(1, 0x80)
    hidden = bytes(raw) + varint(len(name)) + name
    fields = split(body)
    pos = rng.randint(0, len(fields))
    return join(fields[:pos]) + hidden + join(fields[pos:])


def non_minimal_tag(rng, body):
    fields = split(body)
    if not fields:
        return body
    k = rng.randrange(len(fields))
    f, w, v = fields[k]
    key = (f << 3) | w
    n = rng.randint(len(varint(key)) + 1, 6)
    enc = padded_varint(key, n) + (varint(len(v)) if w == 2 else b"") + v
    return join(fields[:k]) + enc + join(fields[k + 1:])


def non_minimal_length(rng, body):
    fields = split(body)
    ld = [i for i, f in enumerate(fields) if f[1] == 2]
    if not ld:
        return body
    k = rng.choice(ld)
    f, _, v = fields[k]
    enc = tag(f, 2) + padded_varint(len(v), rng.randint(len(varint(len(v))) + 1, 6)) + v
    return join(fields[:k]) + enc + join(fields[k + 1:])


def repeated_name(rng, body):
    extra = field_bytes(1, 2, rng.choice(NAMES).encode())
    return extra + body if rng.random() < 0.5 else body + extra


def unknown_field(rng, body):
    field = rng.choice([0, 8, 9, 15, 16, 100, 2047, 2048, (1 << 29) - 1, rng.randint(8, (1 << 29) - 1)])
    wire = rng.randrange(8)
    payload = {0: lambda: varint(rng.randint(0, 1 << 64)), 1: lambda: rng.randbytes(8),
               2: lambda: varint(3) + b"abc", 5: lambda: rng.randbytes(4),
               3: lambda: field_bytes(1, 2, b"preprocess") + (tag(field, 4) if rng.random() < 0.7 else b""),
               4: lambda: b"", 6: lambda: rng.randbytes(rng.randint(0, 4)), 7: lambda: rng.randbytes(rng.randint(0, 4))}
    extra = tag(field, wire) + payload[wire]()
    fields = split(body)
    pos = rng.randint(0, len(fields))
    return join(fields[:pos]) + extra + join(fields[pos:])


def wrong_wire_type(rng, body):
    fields = split(body)
    f = rng.choice([1, 1, 2, 3, 4, 5, 7])
    wire = rng.choice([0, 1, 5, 3])
    value = {0: varint(rng.randint(0, 300)), 1: rng.randbytes(8), 5: rng.randbytes(4), 3: tag(f, 4)}[wire]
    extra = tag(f, wire) + value
    pos = rng.randint(0, len(fields))
    return join(fields[:pos]) + extra + join(fields[pos:])


def truncate(rng, body):
    return body[:rng.randrange(len(body))] if body else body


def bit_flip(rng, body):
    b = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def byte_edit(rng, body):
    b = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        op, pos = rng.randrange(3), rng.randint(0, len(b))
        if op == 0:
            b[pos:pos] = bytes([rng.choice([0x00, 0x0a, 0x80, 0xff, 0x8a, 0x10, rng.randrange(256)])])
        elif op == 1 and b:
            del b[min(pos, len(b) - 1)]
        elif b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
    return bytes(b)


def bad_string(rng, body):
    """A string field (model name, id, version) set to bytes that are or are not valid UTF-8."""
    fields = split(body)
    f = rng.choice([1, 2, 3])
    value = rng.choice(BAD_UTF8 + GOOD_UTF8)
    fields = [x for x in fields if x[0] != f] + [(f, 2, value)] if f == 1 else fields + [(f, 2, value)]
    return join(fields)


def long_varint(rng, body):
    """A scalar (a shape entry, an int64 parameter) as a 10- or 11-byte varint, high bits set or not."""
    n = rng.choice([10, 10, 11])
    raw = bytearray(padded_varint(rng.randint(0, (1 << 63) - 1), n))
    if rng.random() < 0.5:
        raw[-1] |= rng.randrange(1, 0x80)
    shape = tag(3, 0) + bytes(raw)                                     # an unpacked shape entry
    inp = field_bytes(1, 2, b"ENVELOPE") + field_bytes(2, 2, b"BYTES") + shape
    return body + field_bytes(5, 2, inp)


def packed_forms(rng, body):
    """Shapes and tensor contents packed, unpacked, or packed with a ragged length."""
    values = [rng.randint(0, 1 << 40) for _ in range(rng.randint(1, 3))]
    form = rng.randrange(4)
    if form == 0:
        shape = field_bytes(3, 2, b"".join(varint(v) for v in values))
    elif form == 1:
        shape = b"".join(tag(3, 0) + varint(v) for v in values)
    elif form == 2:
        shape = field_bytes(3, 2, b"".join(varint(v) for v in values)[:-1] + b"\x80")
    else:
        floats = rng.randbytes(4 * len(values) + rng.choice([0, 0, 1, 3]))
        shape = field_bytes(5, 2, field_bytes(6, 2, floats))          # contents.fp32_contents, packed
    inp = field_bytes(1, 2, b"ENVELOPE") + shape
    return body + field_bytes(5, 2, inp)


def length_past_end(rng, body):
    n = rng.choice([len(body) + 1, 1 << 31, (1 << 32) + 3, (1 << 35) - 1, rng.randint(1, 1 << 34)])
    enc = padded_varint(n, max(len(varint(n)), 5)) if n >= (1 << 28) else varint(n)
    return body + tag(rng.choice([1, 7, 9]), 2) + enc + b"x" * rng.randint(0, 3)


def splice(rng, body):
    """Two messages concatenated: protobuf merges them (the last model name wins)."""
    other = valid_infer(rng)
    return body + other if rng.random() < 0.5 else other + body


def nested(rng, body):
    """One mutation inside a nested message (a parameter, an input, an output), lengths kept right."""
    fields = split(body)
    inner = [i for i, f in enumerate(fields) if f[0] in MODEL_FIELDS and f[1] == 2]
    if not inner:
        return byte_edit(rng, body)
    k = rng.choice(inner)
    f, w, v = fields[k]
    mutator = rng.choice([non_minimal_tag, non_minimal_length, unknown_field, wrong_wire_type, bit_flip,
                          truncate, hidden_name_long_tag, bad_string])
    try:
        v2 = mutator(rng, v)
    except (ValueError, IndexError):
        v2 = bit_flip(rng, v)
    return join(fields[:k]) + field_bytes(f, 2, v2) + join(fields[k + 1:])


def chain(rng, body):
    """Two or three mutations in a row."""
    for _ in range(rng.randint(2, 3)):
        m = rng.choice(SIMPLE)
        try:
            body = m(rng, body)
        except (ValueError, IndexError):  # split() of a body an earlier step damaged
            body = bit_flip(rng, body)
    return body


SIMPLE = [hidden_name_long_tag, non_minimal_tag, non_minimal_length, repeated_name, unknown_field,
          wrong_wire_type, truncate, bit_flip, byte_edit, bad_string, long_varint, packed_forms,
          length_past_end, splice, nested]
MUTATORS = {"valid": None, **{m.__name__: m for m in SIMPLE}, "chain": chain}


def cases(seed: int, n: int):
    """n generated cases: (mutator name, rpc, body). About one in eight is unmutated; one in ten is a
    ModelConfig request (the other method that names a model), the rest ModelInfer."""
    rng = random.Random(seed)
    names = list(MUTATORS)
    for _ in range(n):
        rpc = "ModelConfig" if rng.random() < 0.1 else "ModelInfer"
        body = valid_infer(rng) if rpc == "ModelInfer" else valid_config(rng)
        name = "valid" if rng.random() < 0.125 else rng.choice(names[1:])
        if name != "valid":
            body = MUTATORS[name](rng, body)
        yield name, rpc, body
