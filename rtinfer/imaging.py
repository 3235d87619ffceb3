"""Image bytes -> the classifier's input: one implementation for the server, the build, clients and baselines.

The classifier takes UINT8 RGB ``[224, 224, 3]`` and normalizes inside its graph, so
this module only decodes, orients, converts and crops. Decoding is defensive: the
format, size and structure are checked from the bytes before any pixel is inflated,
and every failure of a decoder or conversion on a client's image is a ``bad_image``
refusal (never an exception that escapes to the batch).
"""
from __future__ import annotations

import io
import struct
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from rtinfer.errors import Refusal

SIZE = 224
CROP_PADDING = 32      # model card (EfficientNet-Lite, TF reference): shorter side to size + 32 (bicubic), centre crop
RESIZE = SIZE + CROP_PADDING  # 256 for the edge model's 224; the cloud model (Lite2, 260) uses 292
CROPS = ("center", "squash")
DEFAULT_CROP = "center"  # measured on labeled photos: docs/accuracy.md "Preprocessing"
FORMATS = ("JPEG", "PNG")
DEFAULT_MAX_PIXELS = 40_000_000  # about a 7000x5700 photo; Pillow's own bomb guard is 89 M
MAX_JPEG_SCANS = 64    # progressive JPEGs use about 10; each scan re-walks every coefficient
MAX_PNG_CHUNKS = 20_000  # 8 MiB of 400-byte chunks; Pillow parses each chunk in Python
MAX_PNG_ANCILLARY_BYTES = 1 << 20  # text, ICC, EXIF ... together
# Decode cost of one request: ``max_pixels`` is the limit for 8-bit RGB (3 bytes a pixel, a JPEG's full decode), so
# an image may cost max_pixels x 3 bytes. A PNG pixel costs its inflated row bytes (CPU: inflate and unfilter) plus
# what Pillow and the conversion to RGB hold (peak RSS measured: RGB 4, grey 5, 16-bit grey 7, palette 8, alpha 12),
# so a PNG's pixel limit depends on its kind: at the default, about 0.5 s of CPU and 100 MB at most (issue 20; the
# largest of each kind is measured by tests/test_imaging_bounds.py). JPEGs are decoded at reduced scale (draft).
BUDGET_BYTES_PER_PIXEL = 3
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type: grey, RGB, palette, grey+alpha, RGBA
_PNG_HELD = {0: 5, 2: 4, 3: 8, 4: 12, 6: 12}
_PNG_KIND = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}

# Pillow's own per-PNG caps on text chunks (defaults 1 MiB / 64 MiB): far below our envelope size.
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 1 << 20

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_16BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_PLAIN_MODES = {"RGB", "L", "1", "CMYK", "YCbCr"}
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as browsers and viewers do


def _bad(message: str) -> Refusal:
    return Refusal("bad_image", message)


def check_structure(data: bytes) -> None:
    """Format-specific limits a small payload could otherwise use to pin a core."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        chunks, ancillary, pos = 0, 0, 8
        paletted = len(data) > 25 and data[12:16] == b"IHDR" and data[25] == 3
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            chunks += 1
            if paletted and kind == b"IDAT":   # the PNG spec requires PLTE before the pixels of colour type 3
                raise _bad("PNG palette image has no palette (PLTE chunk)")
            if kind == b"PLTE":
                paletted = False
            if kind not in (b"IDAT", b"IHDR", b"PLTE", b"IEND", b"tRNS"):
                ancillary += length
            if chunks > MAX_PNG_CHUNKS:
                raise _bad(f"PNG has more than {MAX_PNG_CHUNKS} chunks")
            if ancillary > MAX_PNG_ANCILLARY_BYTES:
                raise _bad(f"PNG metadata chunks exceed {MAX_PNG_ANCILLARY_BYTES} bytes")
            if kind == b"IEND":
                break
            pos += 12 + length
    elif data[:2] == b"\xff\xd8":
        # 0xFF in entropy-coded data is always stuffed (FF00) or a restart marker, so FFDA is a real SOS.
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise _bad(f"JPEG has {scans} scans, more than the limit of {MAX_JPEG_SCANS}")


def png_cost(data: bytes) -> tuple[str, float] | None:
    """(kind, bytes a pixel costs to decode) from a PNG's IHDR (and tRNS), before any pixel is inflated;
    None for a JPEG or a header Pillow will refuse anyway."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 33 or data[12:16] != b"IHDR":
        return None
    depth, ctype = data[24], data[25]
    if ctype not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        return None
    held = _PNG_HELD[ctype]
    if ctype == 0 and depth == 16:
        held = 7  # 16-bit samples, their high bytes, then RGB
    elif ctype == 3 and _png_has_chunk(data, b"tRNS"):
        held = _PNG_HELD[4]  # a palette with transparency goes through RGBA
    return f"{depth}-bit {_PNG_KIND[ctype]}", _PNG_CHANNELS[ctype] * depth / 8 + held


def _png_has_chunk(data: bytes, want: bytes) -> bool:
    """Whether a chunk ``want`` comes before the pixels (check_structure has bounded the chunk count)."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == want:
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        pos += 12 + length
    return False


def pixel_limit(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, str]:
    """The most pixels this image may have, and why (for the refusal): max_pixels, or fewer for a costly PNG."""
    cost = png_cost(data)
    if cost is None or cost[1] <= BUDGET_BYTES_PER_PIXEL:
        return max_pixels, ""
    kind, per_pixel = cost
    limit = int(max_pixels * BUDGET_BYTES_PER_PIXEL / per_pixel)
    return limit, (f" for a PNG of its kind ({kind}: {per_pixel:g} bytes a pixel to decode; max_pixels "
                   f"{max_pixels} is for 8-bit RGB at {BUDGET_BYTES_PER_PIXEL})")


def _draft_size(width: int, height: int, crop: str, size: int = SIZE) -> tuple[int, int]:
    """Smallest size the crop policy needs, so a JPEG can be decoded at 1/2, 1/4 or 1/8 scale."""
    if crop == "squash":
        return size, size
    scale = (size + CROP_PADDING) / min(width, height)
    return max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale)))


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, crop: str = DEFAULT_CROP,
           draft: bool = True, size: int = SIZE) -> Image.Image:
    """Open and fully decode a JPEG/PNG, checking format, size and structure before decoding.

    ``draft``: JPEGs are decoded straight at the smallest DCT scale that still covers what
    ``crop`` needs at output ``size`` (docs/accuracy.md "JPEG draft decoding": measured not to cost accuracy)."""
    check_structure(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size
            limit, why = pixel_limit(data, max_pixels)
            if width * height > limit:
                raise Refusal("too_many_pixels", f"image is {width}x{height} = {width * height} pixels, "
                                      f"more than the limit of {limit}{why}")
            if width < 1 or height < 1:
                raise _bad("image has no pixels")
            if draft and img.format == "JPEG":
                img.draft("RGB", _draft_size(width, height, crop, size))
            img.load()
    except Refusal:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Refusal("too_many_pixels", "image dimensions are absurd (decompression bomb): "
                              f"more than the limit of {max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise _bad("payload is not a JPEG or PNG image") from None
    except Exception:  # noqa: BLE001 - any decoder failure on client bytes is the client's bad image
        raise _bad("image could not be decoded (corrupt or truncated JPEG or PNG)") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB from whatever mode the file had."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the pixels when nothing turns
    except Exception:  # noqa: BLE001 - a broken EXIF block: keep the pixels as stored
        pass
    mode = img.mode
    try:
        if mode == "RGB":
            return img
        if mode in _16BIT_MODES:  # 16-bit grey: scale to 8 bits (convert() would clip everything >255 to white)
            return Image.fromarray(_high_byte(np.asarray(img))).convert("RGB")
        if mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode in _ALPHA_MODES:
            img = img.convert("RGBA")
        elif mode in _PLAIN_MODES:
            return img.convert("RGB")
        else:
            raise _bad(f"image mode {mode} is not supported "
                       "(8- or 16-bit grey, RGB, palette, CMYK, with or without alpha)")
        if img.mode == "RGBA":
            background = Image.new("RGBA", img.size, BACKGROUND + (255,))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")
    except Refusal:
        raise
    except Exception:  # noqa: BLE001 - e.g. a palette image with transparency and no palette
        raise _bad(f"image could not be converted to RGB (malformed {mode} image)") from None


def _high_byte(arr: np.ndarray) -> np.ndarray:
    """16-bit grey -> 8 bits as ``v >> 8`` in integers: a float64 copy of a big image cost seconds and a GiB."""
    if arr.dtype.itemsize == 2:  # uint16 in either byte order: take the high byte, no arithmetic
        big = arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big")
        return np.ascontiguousarray(arr.view(np.uint8).reshape(*arr.shape, 2)[..., 0 if big else 1])
    return (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)  # mode I (int32) from older Pillow


def fit(img: Image.Image, crop: str = DEFAULT_CROP, size: int = SIZE) -> Image.Image:
    """``center``: shorter side to size + 32 (bicubic), centre size x size (the EfficientNet-Lite model
    card's transform: 256/224 for Lite0, 292/260 for Lite2).
    ``squash``: the whole image to size x size (bilinear), aspect ratio not kept."""
    if crop == "squash":
        return img.resize((size, size), Image.BILINEAR)
    if crop != "center":
        raise ValueError(f"unknown crop policy {crop!r}; one of {CROPS}")
    w, h = img.size
    scale = (size + CROP_PADDING) / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    # resize only the region that ends up in the crop: same pixels, less work on panoramas
    box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
    return img.resize((size, size), Image.BICUBIC, box=box)


def preprocess(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, crop: str = DEFAULT_CROP,
               draft: bool = True, size: int = SIZE) -> np.ndarray:
    """Image bytes -> UINT8 RGB [size, size, 3] (224 by default), what the classifier graphs take."""
    return to_array(fit(to_rgb(decode(data, max_pixels=max_pixels, crop=crop, draft=draft, size=size)), crop, size))


def to_array(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def normalize(batch: np.ndarray) -> np.ndarray:
    """UINT8 [N,H,W,3] -> float32 NCHW, (x - 127) / 128: what the classifier graph does first.

    Only the build's internal FP32 graphs (before the UINT8 front is added) take this."""
    x = np.asarray(batch, dtype=np.float32)
    return np.ascontiguousarray(((x - 127.0) / 128.0).transpose(0, 3, 1, 2))
