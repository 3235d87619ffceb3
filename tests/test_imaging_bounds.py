"""What one hostile PNG may cost preprocess (issue 20, item 4): a 77 KB 16-bit grey PNG of 6324x6324 took
seconds of CPU and 1 GiB RSS through a float64 conversion, stalling every client of the instance.

Each image is decoded by the real ``rtinfer.imaging.preprocess`` in a process of its own, which measures its
CPU time and peak RSS (``resource.getrusage``). The bounds are resource bounds of one request, not speed
claims: the largest PNG of each kind allowed measures about 0.3-0.5 s and 35-105 MB here (2 shared cores),
the old code 1.7 s (4.6 s in the review) and 1 GiB for the 16-bit grey one, about 460 MB for any with alpha.
"""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from rtinfer import imaging
from rtinfer.errors import Refusal

MAX_CPU_S = 1.0      # generous: twice the worst allowed image measured, a third of the old 16-bit cost
MAX_RSS_MB = 300     # generous: about three times the worst allowed image, under a third of the old 1 GiB
HOSTILE_SIDE = 6324  # 6324^2 = 39,992,976: just under max_pixels, as in the review

# (IHDR bit depth, colour type, tRNS): every kind of PNG the decoder accepts
KINDS = {"1-bit grey": (1, 0, False), "grey": (8, 0, False), "16-bit grey": (16, 0, False),
         "RGB": (8, 2, False), "16-bit RGB": (16, 2, False), "palette": (8, 3, False),
         "palette+tRNS": (8, 3, True), "grey+alpha": (8, 4, False), "16-bit grey+alpha": (16, 4, False),
         "RGBA": (8, 6, False), "16-bit RGBA": (16, 6, False)}
HOSTILE = ("16-bit grey", "16-bit RGB", "16-bit grey+alpha", "16-bit RGBA", "RGBA")

_MEASURE = """
import json, resource, sys
from rtinfer import imaging
from rtinfer.errors import Refusal
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF)
try:
    imaging.preprocess(data)
    outcome = "ok"
except Refusal as exc:
    outcome = exc.reason
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"outcome": outcome,
                  "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                  "rss_mb": (after.ru_maxrss - before.ru_maxrss) / 1024}))
"""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(side: int, depth: int, ctype: int, trns: bool = False, *, row_filter: int = 0,
        idat: bytes | None = None) -> bytes:
    """A side x side PNG of zero samples, every row with ``row_filter`` (4, Paeth: the costliest to undo);
    ``idat``: these bytes instead of the pixels (a header-only image)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    if idat is None:
        row, z = bytes([row_filter]) + bytes((side * channels * depth + 7) // 8), zlib.compressobj(1)
        idat = b"".join([z.compress(row) for _ in range(side)] + [z.flush()])
    extra = _chunk(b"PLTE", bytes(3 * 256)) if ctype == 3 else b""
    if trns:
        extra += _chunk(b"tRNS", b"\x00")
    ihdr = struct.pack(">IIBBBBB", side, side, depth, ctype, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def measure(data: bytes, tmp_path) -> dict:
    path = tmp_path / "image.png"
    path.write_bytes(data)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def largest_allowed_side(depth: int, ctype: int, trns: bool) -> int:
    return math.isqrt(imaging.pixel_limit(png(1, depth, ctype, trns), imaging.DEFAULT_MAX_PIXELS)[0])


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_png_just_under_max_pixels_costs_one_request_bounded_cpu_and_memory(kind, tmp_path):
    """The review's file (77 KB, 16-bit grey, 6324x6324) and its 16-bit RGB/RGBA and alpha variants: refused
    or decoded, each within the per-request bounds."""
    got = measure(png(HOSTILE_SIDE, *KINDS[kind]), tmp_path)
    assert got["outcome"] in ("ok", "too_many_pixels"), got
    assert got["cpu_s"] < MAX_CPU_S and got["rss_mb"] < MAX_RSS_MB, (kind, got)


@pytest.mark.parametrize("kind", KINDS)
def test_largest_png_of_each_kind_allowed_is_decoded_within_the_bounds(kind, tmp_path):
    """The pixel limit depends on the PNG's kind: the largest one allowed (rows Paeth-filtered) is served
    within the same bounds, so the bound holds for every image, not just the one reported."""
    side = largest_allowed_side(*KINDS[kind])
    assert side >= 2400, f"a {kind} PNG of {side}x{side} should still be served"
    got = measure(png(side, *KINDS[kind], row_filter=4), tmp_path)
    assert got["outcome"] == "ok", got
    assert got["cpu_s"] < MAX_CPU_S and got["rss_mb"] < MAX_RSS_MB, (kind, side, got)


def test_costly_png_is_refused_from_its_header_with_a_clear_reason():
    """Refused before any pixel is inflated (the IDAT is not even zlib data), saying which limit and why."""
    data = png(HOSTILE_SIDE, 16, 0, idat=b"not zlib")
    with pytest.raises(Refusal) as info:
        imaging.preprocess(data)
    assert info.value.reason == "too_many_pixels"
    message = str(info.value)
    assert "6324x6324" in message and "(16-bit grey:" in message and "max_pixels 40000000" in message, message
    # 8-bit RGB PNGs have a limit of their own too (inflated rows plus what is held): refused from the header
    with pytest.raises(Refusal, match=r"\(8-bit RGB: 7 bytes"):
        imaging.preprocess(png(HOSTILE_SIDE, 8, 2, idat=b"not zlib"))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_grey_becomes_its_high_byte_in_every_byte_order(mode):
    """Integer conversion (v >> 8), the same for every 16-bit layout Pillow may hand over."""
    values = np.array([[0, 255, 256, 32767, 32768, 65280, 65535, 1000]], dtype=np.uint16)
    if mode == "I":
        img = Image.fromarray(values.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        img = Image.frombytes(mode, (values.shape[1], 1), values.astype(dtype).tobytes())
    assert img.mode == mode
    rgb = np.asarray(imaging.to_rgb(img))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, values.shape[1], 3)
    np.testing.assert_array_equal(rgb[..., 0], values >> 8)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
