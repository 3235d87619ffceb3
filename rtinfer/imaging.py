"""Decode a JPEG/PNG payload into the model's input tensor, refusing hostile images early."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from rtinfer.errors import RejectedRequest

SIZE = 224
FORMATS = ("JPEG", "PNG")
DEFAULT_MAX_PIXELS = 40_000_000  # about a 7000x5700 photo; Pillow's own bomb guard is 89 M


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image, checking format and size from the header before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise RejectedRequest("too_many_pixels", f"image is {width}x{height} = {width * height} pixels, "
                                      f"more than the limit of {max_pixels}")
            img.load()
    except RejectedRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RejectedRequest("too_many_pixels", "image dimensions are absurd (decompression bomb): "
                              f"more than the limit of {max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise RejectedRequest("bad_image", "payload is not a JPEG or PNG image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RejectedRequest("bad_image", f"image could not be decoded: {exc}") from None
    return img


def to_tensor(img: Image.Image) -> np.ndarray:
    """RGB, 224x224 bilinear, (x - 127) / 128, CHW float32 (the EfficientNet-Lite convention)."""
    rgb = img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    arr = np.asarray(rgb, dtype=np.float32)
    return ((arr - 127.0) / 128.0).transpose(2, 0, 1).copy()


def preprocess(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    return to_tensor(decode(data, max_pixels=max_pixels))
