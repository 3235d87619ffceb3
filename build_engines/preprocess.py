"""Image -> model input: the served preprocess stage's own code (rtinfer.imaging), so build and server agree."""
import numpy as np
from PIL import Image

from rtinfer import imaging


def to_uint8(img: np.ndarray | Image.Image) -> np.ndarray:
    """One image (HxWx3 uint8 or PIL) -> UINT8 [224,224,3], cropped exactly as the server does."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    return imaging.to_array(imaging.fit(imaging.to_rgb(img)))


def to_input(img: np.ndarray | Image.Image) -> np.ndarray:
    """One image -> float32 [3,224,224], the build's internal FP32 graphs' input."""
    return imaging.normalize(to_uint8(img)[np.newaxis])[0]
