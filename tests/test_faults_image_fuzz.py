"""Bounded fuzz of the image path through a real server: real PNG and JPEG files mutated at chunk and
marker level, each batch mixed with good requests (issue 14).

Every good request is served; every mutated one is served or refused with INVALID_ARG (never
UNAVAILABLE, INTERNAL, a traceback, an exception name or a path); every request is audited once.
The run is bounded by time (FUZZ_SECONDS) and seeded, so a failure names a reproducible case.
"""
from __future__ import annotations

import asyncio
import io
import random
import struct
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import matplotlib
import pytest
import skimage
from PIL import Image
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient

from conftest import model_repository_with, require_model
from helpers import outcome, palette_png_trns_no_plte, records_by_request, start_server as start, verify_all

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
FUZZ_SECONDS = 25
BAD_PER_BATCH, GOOD_PER_BATCH = 4, 4
SKI = Path(skimage.__file__).parent / "data"
MPL = Path(matplotlib.__file__).parent / "mpl-data"


def _reencode(path: Path, **save) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, **save)
    return buf.getvalue()


def seeds() -> dict[str, list[bytes]]:
    """Real files as shipped (several PNG colour types, baseline JPEGs) and a few re-encodings of them
    (palette PNG with tRNS, interlaced PNG, progressive and greyscale JPEG)."""
    png = [(SKI / n).read_bytes() for n in ("chessboard_GRAY.png", "coins.png", "color.png")]
    png += [(MPL / "images" / "hand.png").read_bytes(),
            (MPL / "sample_data" / "Minduka_Present_Blue_Pack.png").read_bytes(),
            _palette_with_trns(), _reencode(SKI / "chessboard_GRAY.png", format="PNG", interlace=1),
            palette_png_trns_no_plte()]
    jpeg = [(MPL / "sample_data" / "grace_hopper.jpg").read_bytes(), (SKI / "rocket.jpg").read_bytes(),
            _reencode(SKI / "rocket.jpg", format="JPEG", progressive=True, quality=80),
            _reencode(SKI / "coins.png", format="JPEG", quality=70)]
    return {"png": png, "jpeg": jpeg}


def _palette_with_trns() -> bytes:
    img = Image.open(MPL / "sample_data" / "Minduka_Present_Blue_Pack.png").convert("RGBA").quantize(64)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


# --- PNG: chunk level --------------------------------------------------------------------------------

def png_chunks(data: bytes) -> list[list]:
    out, pos = [], 8
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        out.append([kind, data[pos + 8:pos + 8 + n]])
        pos += 12 + n
    return out


def png_build(chunks, bad_crc: int | None = None) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for i, (kind, body) in enumerate(chunks):
        crc = zlib.crc32(kind + body) ^ (1 if i == bad_crc else 0)
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc))
    return b"".join(out)


def mutate_png(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    chunks = png_chunks(data)
    op = rng.choice(["drop", "dup", "swap", "ihdr", "idat_bytes", "idat_cut", "insert", "crc", "zlib"])
    i = rng.randrange(len(chunks))
    if op == "drop":
        del chunks[i]
    elif op == "dup":
        chunks.insert(i, list(chunks[i]))
    elif op == "swap" and len(chunks) > 2:
        j = rng.randrange(len(chunks))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif op == "ihdr":
        w, h, depth, ctype, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1][:13])
        field = rng.choice(["w", "h", "depth", "ctype", "inter", "comp"])
        w = rng.choice([0, 1, w * 2, 1400, 0xFFFFFFFF]) if field == "w" else w
        h = rng.choice([0, 1, h * 3, 1400, 0x7FFFFFFF]) if field == "h" else h
        depth = rng.choice([1, 2, 4, 8, 16, 3, 0]) if field == "depth" else depth
        ctype = rng.choice([0, 2, 3, 4, 6, 1, 7]) if field == "ctype" else ctype
        inter = rng.choice([0, 1, 2]) if field == "inter" else inter
        comp = rng.choice([0, 1]) if field == "comp" else comp
        chunks[0][1] = struct.pack(">IIBBBBB", w, h, depth, ctype, comp, filt, inter)
    elif op in ("idat_bytes", "idat_cut", "zlib"):
        idats = [k for k, c in enumerate(chunks) if c[0] == b"IDAT"] or [i]
        k = rng.choice(idats)
        body = bytearray(chunks[k][1])
        if op == "idat_bytes" and body:
            for _ in range(rng.randint(1, 8)):
                body[rng.randrange(len(body))] ^= rng.randint(1, 255)
        elif op == "idat_cut":
            body = body[:rng.randrange(len(body) + 1)]
        else:  # valid zlib, damaged rows (bad filter bytes): gets past inflate into the unfiltering
            raw = bytearray(zlib.decompress(b"".join(c[1] for c in chunks if c[0] == b"IDAT")))
            for _ in range(rng.randint(1, 16)):
                if raw:
                    raw[rng.randrange(len(raw))] = rng.choice([0, 1, 2, 3, 4, 5, 255])
            body = bytearray(zlib.compress(bytes(raw)))
            chunks = [c for c in chunks if c[0] != b"IDAT"]
            chunks.insert(min(k, len(chunks) - 1), [b"IDAT", bytes(body)])
            return op, png_build(chunks)
        chunks[k][1] = bytes(body)
    elif op == "insert":
        kind = rng.choice([b"tRNS", b"PLTE", b"gAMA", b"iCCP", b"zTXt", b"iTXt", b"sBIT", b"bKGD", b"pHYs", b"acTL"])
        body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 3, 6, 13, 256, 769])))
        chunks.insert(rng.randint(1, len(chunks)), [kind, body])
    return op, png_build(chunks, bad_crc=i if op == "crc" else None)


# --- JPEG: marker level ------------------------------------------------------------------------------

def jpeg_segments(data: bytes) -> tuple[list[list], bytes]:
    """(segments before the scan data [[marker, payload]], the rest from the entropy-coded data on)."""
    segs, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        n = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        segs.append([marker, data[pos + 4:pos + 2 + n]])
        pos += 2 + n
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
    return segs, data[pos:]


def jpeg_build(segs, rest: bytes) -> bytes:
    return b"\xff\xd8" + b"".join(b"\xff" + bytes([m]) + struct.pack(">H", len(p) + 2) + p for m, p in segs) + rest


def mutate_jpeg(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    segs, rest = jpeg_segments(data)
    op = rng.choice(["drop", "dup", "sof", "dqt", "dht", "scan_bytes", "scan_cut", "rst", "sos", "swap"])
    i = rng.randrange(len(segs))
    kinds = {m: k for k, (m, _) in enumerate(segs)}  # marker -> its last segment
    if op == "drop":
        del segs[i]
    elif op == "dup":
        segs.insert(i, list(segs[i]))
    elif op == "swap":
        j = rng.randrange(len(segs))
        segs[i], segs[j] = segs[j], segs[i]
    elif op == "sof":
        k = next((k for k, (m, _) in enumerate(segs) if m in (0xC0, 0xC1, 0xC2)), i)
        p = bytearray(segs[k][1])
        if len(p) >= 6:
            field = rng.choice(["prec", "h", "w", "ncomp", "sampling", "table"])
            if field == "prec":
                p[0] = rng.choice([0, 8, 12, 16, 255])
            elif field in ("h", "w"):
                off = 1 if field == "h" else 3
                p[off:off + 2] = struct.pack(">H", rng.choice([0, 1, 1500, 65535]))
            elif field == "ncomp":
                p[5] = rng.choice([0, 1, 2, 3, 4, 255])
            elif len(p) > 8:
                p[7 if field == "sampling" else 8] = rng.randrange(256)
        segs[k][1] = bytes(p)
    elif op in ("dqt", "dht", "sos"):
        marker = {"dqt": 0xDB, "dht": 0xC4, "sos": 0xDA}[op]
        k = kinds.get(marker, i)
        p = bytearray(segs[k][1])
        for _ in range(rng.randint(1, 6)):
            if p:
                p[rng.randrange(len(p))] = rng.choice([0, 1, 0x0F, 0x10, 0x11, 0xFF, rng.randrange(256)])
        segs[k][1] = bytes(p)
    elif op == "scan_bytes":
        r = bytearray(rest)
        for _ in range(rng.randint(1, 32)):
            r[rng.randrange(len(r))] = rng.randrange(256)
        rest = bytes(r)
    elif op == "scan_cut":
        rest = rest[:rng.randrange(len(rest))]
    elif op == "rst":
        pos = rng.randrange(len(rest))
        rest = rest[:pos] + b"\xff" + bytes([rng.choice([0xD0, 0xD7, 0xD9, 0xDA, 0xC0, 0xFE])]) + rest[pos:]
    return op, jpeg_build(segs, rest)


def mutations(rng: random.Random, pool: dict[str, list[bytes]]):
    while True:
        fmt = rng.choice(["png", "jpeg"])
        seed = rng.randrange(len(pool[fmt]))
        op, data = (mutate_png if fmt == "png" else mutate_jpeg)(rng, pool[fmt][seed])
        yield f"{fmt}[{seed}]:{op}", data


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, keyring_path, signing_key):
    """A server of its own (its own audit trail) with a lower pixel limit, so a mutated header cannot
    make one case decode for seconds on this small machine."""
    require_model()
    repo = model_repository_with(tmp_path_factory.mktemp("fuzz-repo"), {"preprocess": {"max_pixels": "2000000"}})
    audit_dir = tmp_path_factory.mktemp("fuzz-audit")
    srv = start(repo, keyring_path, audit_dir, signing_key, tmp_path_factory.mktemp("fuzz-triton"))
    yield srv, audit_dir
    srv.stop()


def test_mutated_png_and_jpeg_files_mixed_with_good_requests(fuzz_server, keys, signing_key):
    srv, audit_dir = fuzz_server
    rng = random.Random(14)
    gen = mutations(rng, seeds())
    good_image = samples.photo("coffee")
    cases: dict[str, tuple[str, str]] = {}  # request id -> (case, outcome)

    async def run(protocol):
        url = srv.grpc_url if protocol == "grpc" else srv.http_url
        c = PipelineClient(url, protocol=protocol, aio=True, key=keys.key("k1"), key_id="k1", client_id="fuzz")

        async def one(case, data):
            rid = f"fuzz-{uuid.uuid4().hex[:12]}"
            kwargs = c.request(c.seal(data), 1, rid)
            try:
                res = c.result(kwargs, await c.client.infer(**kwargs))
                cases[rid] = (case, "served" if case != "good" or res.predictions[0].index == 967 else "wrong")
            except InferenceServerException as exc:
                cases[rid] = (case, outcome(exc))
        try:
            deadline = time.monotonic() + FUZZ_SECONDS / 2
            while time.monotonic() < deadline:
                jobs = [one(*next(gen)) for _ in range(BAD_PER_BATCH)] + [one("good", good_image)
                                                                         for _ in range(GOOD_PER_BATCH)]
                rng.shuffle(jobs)
                await asyncio.gather(*jobs)
        finally:
            await c.close()
    for protocol in ("grpc", "http"):
        asyncio.run(run(protocol))

    good = Counter(o for case, o in cases.values() if case == "good")
    bad = Counter(o for case, o in cases.values() if case != "good")
    assert set(good) == {"served"}, good
    unclean = {rid: v for rid, v in cases.items() if v[0] != "good" and v[1] not in ("served", "invalid")}
    assert not unclean, f"mutated images answered otherwise than served/INVALID_ARG: {list(unclean.values())[:5]}"
    recs = records_by_request(audit_dir)
    for rid, (case, out) in cases.items():
        assert len(recs.get(rid, [])) == 1, (rid, case, out, recs.get(rid))
        assert recs[rid][0]["event"] == ("served" if out == "served" else "rejected"), (case, recs[rid][0])
    reasons = Counter(recs[rid][0].get("reason") for rid, (case, out) in cases.items() if out == "invalid")
    verify_all(audit_dir, signing_key, allow_torn=False)
    print(f"\nFUZZ {len(cases)} requests in {FUZZ_SECONDS} s: good {dict(good)}, mutated {dict(bad)}, "
          f"refusal reasons {dict(reasons)}")
