"""Image -> model input: the served preprocess stage's own code (rtinfer.imaging), so build and server agree."""
import numpy as np
from PIL import Image

from rtinfer import imaging


def to_uint8(img: np.ndarray | Image.Image, size: int = imaging.SIZE) -> np.ndarray:
    """One image (HxWx3 uint8 or PIL) -> UINT8 [size,size,3] (224: Lite0), cropped exactly as the server does."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    return imaging.to_array(imaging.fit(imaging.to_rgb(img), size=size))


def to_input(img: np.ndarray | Image.Image, size: int = imaging.SIZE) -> np.ndarray:
    """One image -> float32 [3,size,size], the build's internal FP32 graphs' input."""
    return imaging.normalize(to_uint8(img, size)[np.newaxis])[0]
