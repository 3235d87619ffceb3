"""Image -> model input: the served preprocess stage's own code (rtinfer.imaging), so build and server agree."""
import numpy as np
from PIL import Image

from rtinfer.imaging import to_tensor


def to_input(img: np.ndarray | Image.Image) -> np.ndarray:
    """One image (HxWx3 uint8 or PIL) -> float32 [3,224,224]."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    return to_tensor(img)
