"""Known answers every installed variant must give (the served pipeline is tested on the same facts)."""
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .paths import INPUT_NAME, OUTPUT_NAME
from .preprocess import to_input
from .runtime import as_input

CAT_CLASSES = set(range(281, 286))   # tabby .. Egyptian cat
ESPRESSO = 967


def sanity_images() -> dict:
    from skimage import data
    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


def check_sanity(model_path: Path) -> dict:
    """Run chelsea and coffee through ONNX Runtime; raise if the classes are wrong."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    imgs = sanity_images()
    inp = sess.get_inputs()[0]
    size = inp.shape[1] if inp.type == "tensor(uint8)" else inp.shape[2]  # NHWC uint8 or NCHW float
    size = size if isinstance(size, int) else 224
    x = np.stack([to_input(imgs["chelsea"], size), to_input(imgs["coffee"], size)])
    logits = sess.run([OUTPUT_NAME], {INPUT_NAME: as_input(sess, x)})[0]
    top = logits.argmax(axis=1)
    result = {"chelsea": int(top[0]), "coffee": int(top[1])}
    if result["chelsea"] not in CAT_CLASSES or result["coffee"] != ESPRESSO:
        raise AssertionError(f"{model_path}: sanity check failed: {result} (want cat 281-285, espresso 967)")
    return result
