"""Run a candidate ONNX on an image set and score it against the reference logits."""

import numpy as np

from . import fidelity, runtime


class Reference:
    """The original model's logits on an image set, and the set's labels when it has them.

    Slicing keeps the two aligned (scans score on the first n images)."""

    def __init__(self, logits: np.ndarray, labels: np.ndarray | None = None):
        self.logits, self.labels = logits, labels

    def __getitem__(self, key) -> "Reference":
        return Reference(self.logits[key], None if self.labels is None else self.labels[key])

    def __len__(self) -> int:
        return len(self.logits)


def run(model, x: np.ndarray) -> np.ndarray:
    return runtime.logits(runtime.session(model), x)


def score(model, x: np.ndarray, ref) -> dict:
    """`model`: path or serialized bytes; `ref`: Reference (or bare reference logits).
    Returns top-1 agreement, top-5 overlap, mean KL, `quality` (+ accuracy when labeled)."""
    if not isinstance(ref, Reference):
        ref = Reference(ref)
    return fidelity.compare(ref.logits, run(model, x), ref.labels)
