"""Image decoding: the sanity of the tensor, and hostile inputs refused before heavy work."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clients import samples
from rtinfer import imaging
from rtinfer.errors import RejectedRequest


def test_tensor_layout_and_normalization():
    img = Image.new("RGB", (300, 200), (255, 127, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = imaging.preprocess(buf.getvalue())
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 100, 100], [(255 - 127) / 128, 0.0, -127 / 128], atol=1e-6)


def test_real_photo_decodes():
    x = imaging.preprocess(samples.photo("chelsea"))
    assert -1.0 <= x.min() < x.max() <= 1.0


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: the bomb is caught before any pixel is inflated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data,reason", [
    (b"this is not an image at all", "bad_image"),
    (samples.photo("coffee")[:2000], "bad_image"),  # a JPEG cut short
    (_png_header_only(100_000, 100_000), "too_many_pixels"),
])
def test_rejections(data, reason):
    with pytest.raises(RejectedRequest) as info:
        imaging.preprocess(data)
    assert info.value.reason == reason, str(info.value)


def test_pixel_limit_is_configurable():
    with pytest.raises(RejectedRequest, match="more than the limit of 1000"):
        imaging.preprocess(samples.photo("chelsea"), max_pixels=1000)


def test_other_formats_refused():
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, format="GIF")
    with pytest.raises(RejectedRequest) as info:
        imaging.preprocess(buf.getvalue())
    assert info.value.reason == "bad_image"
