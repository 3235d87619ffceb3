"""Image decoding: the classifier's UINT8 input, orientation, every mode, crops, and hostile inputs."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clients import samples
from rtinfer import imaging
from rtinfer.errors import Refusal

from helpers import png_bytes as _png, png_chunk as _chunk, png_header_only as _png_header_only


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_uint8_rgb_contract_and_normalization():
    x = imaging.preprocess(_encode(Image.new("RGB", (300, 200), (255, 127, 0))))
    assert x.shape == (224, 224, 3) and x.dtype == np.uint8
    assert tuple(x[100, 100]) == (255, 127, 0)
    f = imaging.normalize(x[np.newaxis])
    assert f.shape == (1, 3, 224, 224) and f.dtype == np.float32
    np.testing.assert_allclose(f[0, :, 100, 100], [(255 - 127) / 128, 0.0, -127 / 128], atol=1e-7)


def test_real_photo_decodes():
    x = imaging.preprocess(samples.photo("chelsea"))
    assert x.shape == (224, 224, 3) and 0 <= x.min() < x.max() <= 255


def test_center_crop_keeps_aspect_and_squash_does_not():
    """A wide image with a red left third: the centre crop cuts it away, the squash keeps it."""
    arr = np.zeros((256, 768, 3), np.uint8)
    arr[:, :256] = (255, 0, 0)
    data = _encode(Image.fromarray(arr))
    centre = imaging.preprocess(data, crop="center")
    squash = imaging.preprocess(data, crop="squash")
    assert centre[:, :, 0].max() == 0                      # centre 256x256 of the 768-wide image: no red
    assert squash[:, :60, 0].min() > 200                   # squashed: the left third stays red


def test_center_crop_matches_resize_then_crop():
    """The box-resize shortcut equals the model card's resize(256) + centre crop(224)."""
    img = Image.open(io.BytesIO(samples.photo("chelsea"))).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    full = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
    left, top = (full.width - 224) // 2, (full.height - 224) // 2
    want = np.asarray(full.crop((left, top, left + 224, top + 224)), dtype=np.int16)
    got = imaging.preprocess(_encode(img), crop="center").astype(np.int16)
    assert np.abs(got - want).mean() < 1.0


def test_exif_orientation_applied():
    """A portrait photo stored sideways with EXIF orientation 6 comes out upright."""
    arr = np.zeros((300, 400, 3), np.uint8)
    arr[:, :200] = (255, 255, 255)   # stored: white left half; rotated 90 deg clockwise: white top half
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    x = imaging.preprocess(data, crop="squash")
    assert x[:100].mean() > 200 and x[-100:].mean() < 50


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    data = _encode(Image.fromarray(ramp))   # mode I;16, saved as a 16-bit grey PNG
    x = imaging.preprocess(data, crop="squash")
    assert x.std() > 50, "a 16-bit ramp must stay a ramp, not turn white"
    assert abs(float(x.mean()) - 127.5) < 10


@pytest.mark.parametrize("mode,colour,want", [
    ("L", 128, (128, 128, 128)),
    ("1", 1, (255, 255, 255)),
    ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),   # fully transparent: the white background
    ("LA", (0, 255), (0, 0, 0)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_modes_become_8bit_rgb(mode, colour, want):
    img = Image.new(mode, (64, 64), colour)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    x = imaging.preprocess(_encode(img, fmt, **({"quality": 100} if fmt == "JPEG" else {})), crop="squash")
    assert np.abs(x[32, 32].astype(int) - np.array(want)).max() <= 3, (mode, x[32, 32])


def test_palette_with_transparency():
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    data = _encode(img, transparency=0)
    x = imaging.preprocess(data, crop="squash")
    assert tuple(x[10, 10]) == (255, 255, 255)


def test_palette_trns_without_plte_is_a_clean_refusal():
    """Issue 14: an 81-byte palette PNG with tRNS and no PLTE made convert("RGB") raise AssertionError
    outside the decoder's guard. A palette image without its palette is malformed: bad_image."""
    ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 3, 0, 0, 0)
    data = _png(ihdr, _chunk(b"tRNS", b"\x00"), _chunk(b"IDAT", zlib.compress(b"\x00" * 20)))
    with pytest.raises(Refusal) as info:
        imaging.preprocess(data)
    assert info.value.reason == "bad_image" and "PLTE" in str(info.value)


def test_conversion_failure_is_a_clean_refusal(monkeypatch):
    """Whatever a conversion raises on a client's image becomes bad_image, with no exception name."""
    def broken(self, *a, **k):
        raise AssertionError("internal detail /usr/lib/python3/PIL")
    monkeypatch.setattr(Image.Image, "convert", broken)
    with pytest.raises(Refusal) as info:
        imaging.preprocess(_encode(Image.new("L", (8, 8))))
    assert info.value.reason == "bad_image"
    assert "Assertion" not in str(info.value) and "/" not in str(info.value)


def test_jpeg_draft_decodes_less_and_agrees():
    """A phone-size JPEG decoded at reduced scale gives (almost) the same crop."""
    img = Image.open(io.BytesIO(samples.photo("chelsea"))).convert("RGB").resize((2400, 1800), Image.BICUBIC)
    data = _encode(img, "JPEG", quality=90)
    a = imaging.preprocess(data, draft=True).astype(int)
    b = imaging.preprocess(data, draft=False).astype(int)
    assert np.abs(a - b).mean() < 2.0
    assert imaging.decode(data, draft=True).size[0] < 2400


def test_png_header_bomb_refused_before_inflating():
    with pytest.raises(Refusal) as info:
        imaging.preprocess(_png_header_only(100_000, 100_000))
    assert info.value.reason == "too_many_pixels"


def test_png_chunk_flood_refused():
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    flood = _chunk(b"tEXt", b"k\x00v") * (imaging.MAX_PNG_CHUNKS + 5)
    with pytest.raises(Refusal, match="chunks"):
        imaging.preprocess(_png(ihdr, flood))


def test_jpeg_scan_flood_refused():
    data = samples.photo("coffee")
    bomb = data[:-2] + b"\xff\xda" * (imaging.MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    with pytest.raises(Refusal, match="scans"):
        imaging.preprocess(bomb)


@pytest.mark.parametrize("data,reason", [
    (b"this is not an image at all", "bad_image"),
    (samples.photo("coffee")[:2000], "bad_image"),  # a JPEG cut short
])
def test_rejections(data, reason):
    with pytest.raises(Refusal) as info:
        imaging.preprocess(data)
    assert info.value.reason == reason, str(info.value)


def test_pixel_limit_is_configurable():
    with pytest.raises(Refusal, match="more than the limit of 1000"):
        imaging.preprocess(samples.photo("chelsea"), max_pixels=1000)


def test_other_formats_refused():
    with pytest.raises(Refusal) as info:
        imaging.preprocess(_encode(Image.new("RGB", (10, 10)), "GIF"))
    assert info.value.reason == "bad_image"
