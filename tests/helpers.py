"""Helpers that several test modules use (fixtures live in conftest.py). Test modules import shared code
from here or from conftest, never from each other; the names other modules used to import from a test
module are still re-exported there (``from test_pipeline_server import records_for`` keeps working).
"""
from __future__ import annotations

import asyncio
import csv
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import uuid
import zlib

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients import samples
from rtinfer import audit, checkpoint, envelope, routing
from rtinfer.launch.server import ROOT, TritonServer

CATS = range(281, 286)  # ImageNet's domestic cats (chelsea is one of them)
ESPRESSO = 967  # coffee
INVALID = ("StatusCode.INVALID_ARGUMENT", "400")
RETRY = ("StatusCode.UNAVAILABLE", "503")
REPO = ROOT / "model_repository"


# --- servers -----------------------------------------------------------------------------------

def start_server(repo, keyring_path, audit_dir, signing_key, work) -> TritonServer:
    """A started pipeline server on ``repo`` writing (and signing) its audit trail to ``audit_dir``."""
    return TritonServer(repo, keyring=str(keyring_path), audit_dir=str(audit_dir),
                        audit_signing_key=str(signing_key[0]), workdir=work).start()


def batch_stats(server, model) -> dict[int, int]:
    """Triton's statistics for ``model``: batch size -> executions of that size."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    stats = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
    c.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def outcome(exc: InferenceServerException) -> str:
    """'invalid' | 'unavailable' | 'other: ...'; never a traceback, exception name or path in the message."""
    msg, status = exc.message(), str(exc.status())
    assert "Traceback" not in msg and ".py" not in msg and "Error:" not in msg and "/" not in msg, msg
    return "invalid" if status in INVALID else "unavailable" if status in RETRY else f"other: {status} {msg}"


# --- audit trail -------------------------------------------------------------------------------

def records_for(audit_dir, request_id) -> list[dict]:
    return [r for r in audit.read_records(audit_dir) if r.get("request_id") == request_id]


def records_by_request(audit_dir) -> dict[str, list[dict]]:
    out: dict[str, list] = {}
    for r in audit.read_records(audit_dir):
        if r.get("request_id"):
            out.setdefault(r["request_id"], []).append(r)
    return out


def verify_all(audit_dir, signing_key, allow_torn=False):
    """Every chain of ``audit_dir`` verifies, checkpoints checked against the public key."""
    public = checkpoint.load_public(signing_key[1])
    result = audit.verify_path(audit_dir, public=public)
    for chain, reports in result.items():
        for rep in reports:
            assert rep.ok, (chain, rep)
            assert allow_torn or not rep.torn_tail, (chain, rep)
    return result


def signed_trail(audit_dir, public_key_path, request_ids, chains=("preprocess", "postprocess"), timeout=40.0):
    """The trail of a running server once every chain is covered by a signed checkpoint (the stages sign
    on an interval: polled up to ``timeout``). Asserts: it verifies with the public key (links and every
    signature), it holds a record for each of ``request_ids``, and each of ``chains`` (name prefixes) has
    records. Returns {chain: [Report]}."""
    public = checkpoint.load_public(public_key_path)
    deadline = time.monotonic() + timeout
    while True:
        result = audit.verify_path(audit_dir, public=public)
        for chain, reports in result.items():
            assert all(r.ok for r in reports), (chain, [r for r in reports if not r.ok])
        if all(reps[-1].unsigned == 0 for reps in result.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    unsigned = {c: reps[-1].unsigned for c, reps in result.items() if reps[-1].unsigned}
    assert not unsigned, f"records not covered by a signed checkpoint after {timeout:.0f} s: {unsigned}"
    for prefix in chains:
        mine = [c for c in result if c.startswith(prefix + "_")]
        assert mine and sum(r.records for c in mine for r in result[c]) > 0, (prefix, sorted(result))
        assert sum(r.checkpoints for c in mine for r in result[c]) > 0, (prefix, "no signed checkpoint")
    have = records_by_request(audit_dir)
    missing = [rid for rid in request_ids if rid not in have]
    assert not missing, f"no audit record for {missing}"
    return result


# --- requests ----------------------------------------------------------------------------------

def tampered(sealed: bytes) -> bytes:
    b = bytearray(sealed)
    b[-30] ^= 0xFF
    return bytes(b)


def expect_rejected(client, sealed, fragment, reason, audit_dir):
    """Rejected with INVALID_ARGUMENT / 400, a message saying what was wrong, audited, no traceback."""
    rid = uuid.uuid4().hex
    with pytest.raises(InferenceServerException) as info:
        client.infer_envelope(sealed, request_id=rid)
    msg, status = info.value.message(), str(info.value.status())
    assert fragment in msg, msg
    assert "Traceback" not in msg and ".py" not in msg
    assert "k9" not in msg and "pipeline_onnx" not in msg  # no key ids or served pipelines before authentication
    assert status in ("StatusCode.INVALID_ARGUMENT", "400"), status
    [rec] = records_for(audit_dir, rid)
    assert rec["event"] == "rejected" and rec["reason"] == reason and rec["stage"] == "preprocess"
    return rec


def send_mixed(make_client, id_prefix: str, n: int = 24, photos=("chelsea", "coffee")) -> list:
    """``n`` concurrent requests, ``photos`` in turn (request i sends ``photos[i % len(photos)]``), every
    third tampered (its refusal checked); per request the result. ``make_client()`` makes an aio
    PipelineClient (they bind to the running loop)."""
    images = [samples.photo(p) for p in photos]

    async def run():
        client = make_client()

        async def one(i):
            sealed = client.seal(images[i % len(images)])
            kwargs = client.request(tampered(sealed) if i % 3 == 0 else sealed, 1, f"{id_prefix}-{i}")
            try:
                return client.result(kwargs, await client.client.infer(**kwargs))
            except InferenceServerException as exc:
                return exc
        try:
            return await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await client.close()

    results = asyncio.run(run())
    for i, res in enumerate(results):
        if i % 3 == 0:
            assert isinstance(res, InferenceServerException) and "authentication failed" in res.message()
        else:
            assert not isinstance(res, Exception), res
    return results


# --- images ------------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(ihdr: bytes, *chunks: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + b"".join(chunks) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header, a few bytes of data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return png_bytes(ihdr, png_chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def palette_png_trns_no_plte() -> bytes:
    """Issue 14 (1): a palette PNG with a tRNS chunk and no PLTE; Pillow's convert("RGB") asserted on it."""
    return png_bytes(struct.pack(">IIBBBBB", 1, 1, 8, 3, 0, 0, 0), png_chunk(b"tRNS", b"\x00"),
                     png_chunk(b"IDAT", zlib.compress(b"\x00\x00")))


BAD_ENVELOPES = {
    "tampered": (lambda c, k: tampered(c.seal(samples.photo("coffee"))), "authentication failed", "auth_failed"),
    "wrong key": (lambda c, k: envelope.seal(b"x" * 100, k.key("k2"), key_id="k1", client_id=c.client_id,
                                             pipeline="pipeline"), "authentication failed", "auth_failed"),
    "unknown key": (lambda c, k: envelope.seal(b"x", os.urandom(32), key_id="k9", client_id=c.client_id,
                                               pipeline="pipeline"), "authentication failed", "unknown_key"),
    "truncated": (lambda c, k: c.seal(samples.photo("coffee"))[:20], "envelope truncated", "truncated"),
    "wrong pipeline": (lambda c, k: envelope.seal(samples.photo("coffee"), k.key("k1"), key_id="k1",
                                                  client_id=c.client_id, pipeline="other_service"),
                       "authentication failed", "wrong_pipeline"),
    "wrong client": (lambda c, k: envelope.seal(samples.photo("coffee"), k.key("k1"), key_id="k1",
                                                client_id="somebody-else", pipeline="pipeline"),
                     "does not match the envelope's sealed client id", "client_mismatch"),
    "corrupt image": (lambda c, k: c.seal(samples.photo("coffee")[:3000]), "could not be decoded", "bad_image"),
    "not an image": (lambda c, k: c.seal(b"GIF89a definitely not a photo"), "not a JPEG or PNG", "bad_image"),
    "decompression bomb": (lambda c, k: c.seal(png_header_only(60_000, 60_000)), "more than the limit",
                           "too_many_pixels"),
    "oversized": (lambda c, k: c.seal(b"\0" * (8 * 1024 * 1024 + 1)), "more than the limit of 8388608",
                  "too_large"),
}


# --- the cascade -------------------------------------------------------------------------------

def cascade_policy() -> routing.Policy:
    """The decision this host's cascade config makes (the test follows the configured default)."""
    text = (REPO / "cascade" / "configs" / "cpu.pbtxt").read_text()
    param = {k: v for k, v in re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text)}
    return routing.Policy(param["confidence_metric"], float(param["threshold"]))


# --- metrics, Prometheus, Locust, the gateway's log ---------------------------------------------

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


def parse_metrics(text: str) -> dict[tuple, float]:
    """Prometheus text format -> {(name, ((label, value), ...)): value}."""
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m[2] or "")))
            out[(m[1], labels)] = float(m[3])
    return out


def metric_value(samples_: dict, name: str, **labels) -> float:
    """The sum of ``name``'s series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples_.items() if n == name and want <= set(ls))


def promtool() -> str:
    tool = shutil.which("promtool") or "/usr/bin/promtool"
    if not shutil.which(tool):  # make test installs it first (make prometheus): a failure, not a skip
        pytest.fail("promtool is not installed: run `make prometheus` (apt-get install prometheus as root)")
    return tool


def locust(server, keyring_path, prefix, seconds=4, users=2, extra=()):
    """A headless Locust run of both users against ``server`` -> (process, {(type, name): stats row})."""
    cmd = [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-u", str(users),
           "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "5", "--csv", str(prefix), "--only-summary",
           "--triton-grpc", server.grpc_url, "--triton-http", server.http_url, "--keyring", str(keyring_path),
           "--top-k", "3", *extra, "GrpcPipelineUser", "HttpPipelineUser"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    with open(f"{prefix}_stats.csv", newline="") as fh:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}
    return proc, rows


def log_after(gw, mark: int, pattern: str) -> list[str]:
    """Gateway access-log lines written after ``mark`` (a length of the log) that match ``pattern``."""
    deadline = time.monotonic() + 5
    while True:  # HAProxy writes the line when the transaction ends, just after the reply
        lines = [ln for ln in gw.log_text()[mark:].splitlines() if re.search(pattern, ln)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def wait_until(predicate, timeout: float = 10.0, step: float = 0.01) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` has passed (for background threads: no fixed
    sleep); returns its last value."""
    deadline = time.monotonic() + timeout
    while not (ok := predicate()) and time.monotonic() < deadline:
        time.sleep(step)
    return bool(ok)
