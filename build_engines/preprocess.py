"""Image -> model input, exactly as the served preprocess stage does it: RGB 224x224 bilinear, (x-127)/128."""
import numpy as np
from PIL import Image

from .paths import IMAGE_SIZE


def to_input(img: np.ndarray | Image.Image) -> np.ndarray:
    """One image (HxWx3 uint8 or PIL) -> float32 [3,224,224]."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(2, 0, 1))
