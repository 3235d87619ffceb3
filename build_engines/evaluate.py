"""Run a candidate ONNX on an image set and score it against the reference logits."""
from pathlib import Path

import numpy as np

from . import fidelity, runtime


def run(model, x: np.ndarray) -> np.ndarray:
    return runtime.logits(runtime.session(model), x)


def score(model, x: np.ndarray, ref: np.ndarray) -> dict:
    """`model`: path or serialized bytes. Returns top-1 agreement, top-5 overlap, mean KL."""
    return fidelity.compare(ref, run(model, x))
