"""The gateway's gRPC reader proved against the real protobuf parsers, on generated messages.

The gateway decides from the bytes of a ModelInfer (or ModelConfig) message whether it may reach
Triton; Triton then parses the same bytes with C++ libprotobuf. A reader that disagrees with that
parser on one encoding lets a request through for one model and delivers it to another (a 5-byte
tag did exactly that). So the reader, deploy/gateway/grpc_message.lua, runs here in-process under
Lua 5.3 (HAProxy 2.6's Lua) on generated messages (tests/grpc_cases.py), and for every message it
would forward:

- C++ libprotobuf (generated code, as Triton runs it; tests/protobuf_oracle.py) parses it,
- the Python protobuf parser (upb, through tritonclient's service_pb2 and a fresh pool) parses it,
- all of them read the same model name, which is an exposed one, and the gateway saw exactly it.

`make test` runs GATEWAY_DIFF_CASES (20,000) cases from a fixed seed; `make fuzz-gateway` runs
a longer one from a new seed. The reader from before the fix is kept (tests/oracle/) to show that
this test finds that bug.
"""
from __future__ import annotations

import collections
import os
import struct
from pathlib import Path

import lupa.lua53 as lua53
import pytest
from tritonclient.grpc import service_pb2

from rtinfer.launch.gateway import CONFIG_DIR, MAX_REQUEST_BYTES

import grpc_cases
import protobuf_oracle

READER = CONFIG_DIR / "grpc_message.lua"
READER_BEFORE_FIX = Path(__file__).parent / "oracle" / "reader_before_fix.lua"
MODELS = ",".join(grpc_cases.ALLOWED)
CASES = int(os.environ.get("GATEWAY_DIFF_CASES", "20000"))
SEED = int(os.environ.get("GATEWAY_DIFF_SEED", "20261206"))


def load_reader(path: Path):
    """The reader's check(body, rpc, models, max) as a Python function -> (reason or None, [names])."""
    runtime = lua53.LuaRuntime(encoding=None, unpack_returned_tuples=True)
    assert runtime.eval("_VERSION") == b"Lua 5.3"
    module = runtime.execute(path.read_bytes())

    def check(body: bytes, rpc: str, models: str = MODELS, max_bytes: int = MAX_REQUEST_BYTES):
        reason, names = module[b"check"](body, rpc.encode(), models.encode(), max_bytes)
        return (reason.decode() if reason is not None else None), [names[k] for k in sorted(names.keys())]
    check.module = module
    return check


def frame(body: bytes, flag: int = 0) -> bytes:
    """One gRPC length-prefixed message."""
    return struct.pack(">BI", flag, len(body)) + body


@pytest.fixture(scope="module")
def cpp():
    try:
        return protobuf_oracle.CppParser()
    except protobuf_oracle.OracleUnavailable as exc:  # make test installs the toolchain: a failure, not a skip
        pytest.fail(str(exc))


def differential(check, cpp, seed: int, n: int):
    """Run n generated cases; returns (per-mutator tallies, violations)."""
    generated = list(grpc_cases.cases(seed, n))
    by_rpc = collections.defaultdict(list)
    for k, (_, rpc, _body) in enumerate(generated):
        by_rpc[rpc].append(k)
    cpp_names = {}
    for rpc, idx in by_rpc.items():
        for k, name in zip(idx, cpp.parse(rpc, [generated[k][2] for k in idx])):
            cpp_names[k] = name
    tally = collections.defaultdict(collections.Counter)
    violations = []
    for k, (mutator, rpc, body) in enumerate(generated):
        reason, names = check(frame(body), rpc)
        upb = protobuf_oracle.upb_parse(rpc, body)
        parsed = [cpp_names[k], *upb]
        t = tally[mutator]
        t["cases"] += 1
        t["protobuf parses"] += all(p is not None for p in parsed)
        t["C++ and upb disagree"] += len(set(parsed)) > 1
        if reason is None:
            t["forwarded"] += 1
            ok = (all(p is not None for p in parsed) and len(set(parsed)) == 1
                  and parsed[0].decode(errors="replace") in grpc_cases.ALLOWED and names == [parsed[0]])
            if not ok:
                t["VIOLATION"] += 1
                violations.append((mutator, rpc, body.hex(), names, parsed))
        else:
            t[f"refused {reason}"] += 1
            if reason != "model_not_allowed" and all(p is not None for p in parsed) and len(set(parsed)) == 1:
                t["refused, protobuf accepts"] += 1  # the reader's strictness (no unknown fields, ...)
        if mutator == "valid" and all(p is not None and p.decode(errors="replace") in grpc_cases.ALLOWED
                                      for p in parsed):
            t["valid, exposed"] += 1
            if reason is not None:
                t["VALID REFUSED"] += 1
                violations.append(("valid refused", rpc, body.hex(), reason, parsed))
    return tally, violations


def report(tally) -> str:
    cols = ["cases", "forwarded", "protobuf parses", "refused, protobuf accepts", "C++ and upb disagree", "VIOLATION"]
    lines = [f"{'mutator':22s} " + " ".join(f"{c[:14]:>14s}" for c in cols)]
    for name in sorted(tally):
        lines.append(f"{name:22s} " + " ".join(f"{tally[name][c]:14d}" for c in cols))
    total = sum((tally[n] for n in tally), collections.Counter())
    lines.append(f"{'total':22s} " + " ".join(f"{total[c]:14d}" for c in cols))
    return "\n".join(lines)


def test_reader_agrees_with_protobuf_on_generated_messages(cpp, capsys):
    check = load_reader(READER)
    tally, violations = differential(check, cpp, SEED, CASES)
    with capsys.disabled():
        print(f"\ngateway differential: {CASES} cases, seed {SEED} (GATEWAY_DIFF_CASES, GATEWAY_DIFF_SEED)")
        print(report(tally))
    assert not violations, violations[:5]
    total = sum((tally[n] for n in tally), collections.Counter())
    assert total["cases"] == CASES
    # the generator reaches what it aims at: forwarded and refused messages, protobuf-valid ones the
    # reader refuses, and messages on which the C++ and Python parsers themselves disagree
    assert total["forwarded"] > CASES // 20 and total["valid, exposed"] > 0
    assert tally["hidden_name_long_tag"]["C++ and upb disagree"] > 0
    assert tally["hidden_name_long_tag"]["forwarded"] == 0


def test_the_differential_finds_the_tag_bug_in_the_reader_before_the_fix(cpp):
    """The same test, run on the reader that shipped with the bug, fails: on the 5-byte tag."""
    tally, violations = differential(load_reader(READER_BEFORE_FIX), cpp, SEED, min(CASES, 4000))
    found = collections.Counter(v[0] for v in violations)
    assert found["hidden_name_long_tag"] > 0, report(tally)


ATTACK = b"\x0a\x08pipeline" + b"\x8a\x80\x80\x80\x10" + b"\x0apreprocess"


def test_the_reported_bypass(cpp):
    """`0a 08 "pipeline"`, then `8a 80 80 80 10 0a "preprocess"`: field 1 twice to C++ protobuf."""
    assert cpp.parse("ModelInfer", [ATTACK]) == [b"preprocess"]
    assert load_reader(READER_BEFORE_FIX)(frame(ATTACK), "ModelInfer") == (None, [b"pipeline"])
    assert load_reader(READER)(frame(ATTACK), "ModelInfer")[0] == "malformed_message"


@pytest.mark.parametrize("body, rpc, reason", [
    (b"", "ModelInfer", "malformed_message"),
    (frame(b"\x0a\x08pipeline", flag=1), "ModelInfer", "compressed"),
    (frame(b"\x0a\x08pipeline")[:-1], "ModelInfer", "incomplete_message"),
    (frame(b"\x0a\x08pipeline") * 2, "ModelInfer", "malformed_message"),
    (struct.pack(">BI", 0, MAX_REQUEST_BYTES), "ModelInfer", "too_large"),
    (frame(b""), "ModelInfer", "model_not_allowed"),
    (frame(b""), "ServerLive", None),
    (frame(b"\x0a\x00"), "ServerLive", "malformed_message"),          # the open methods' messages are empty
    (struct.pack(">BI", 0, 12 << 20), "ServerLive", "too_large"),
    (frame(b""), "ModelStreamInfer", "route_not_allowed"),
    (frame(b"\x0a\x08pipeline"), "ModelConfig", None),
    (frame(b"\x0a\x0apreprocess"), "ModelConfig", "model_not_allowed"),
])
def test_framing_and_methods(body, rpc, reason):
    assert load_reader(READER)(body, rpc)[0] == reason


PROTO_KINDS = {  # FieldDescriptor.type -> the reader's kind for a scalar
    8: "varint", 3: "varint", 4: "varint", 5: "varint", 13: "varint", 14: "varint",
    1: "fixed64", 2: "fixed32", 9: "string", 12: "bytes"}


def lua_schema(table) -> dict:
    out = {}
    for k in sorted(table.keys()):
        v = table[k]
        out[k] = v.decode() if isinstance(v, bytes) else lua_schema(v)
    return out


def proto_schema(desc) -> dict:
    out = {}
    for f in desc.fields:
        if f.message_type is not None:
            out[f.number] = proto_schema(f.message_type)
        else:
            kind = PROTO_KINDS[f.type]
            out[f.number] = kind + "[]" if f.is_repeated and kind not in ("string", "bytes") else kind
    return out


@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelReady", "ModelMetadata", "ModelConfig",
                                 "ServerLive", "ServerReady", "ServerMetadata"])
def test_reader_schema_is_the_proto_that_tritonclient_ships(rpc):
    """The reader's schema (written by hand in Lua) is grpc_service.proto's, field for field."""
    schemas = load_reader(READER).module[b"SCHEMAS"]
    desc = getattr(service_pb2, f"{rpc}Request").DESCRIPTOR
    assert lua_schema(schemas[rpc.encode()]) == proto_schema(desc)
