"""Guards on the cascade's measured figures (docs/cascade.md "Choosing the threshold"), from what `make engines`
built on the labeled photos' held-out confirm split: Lite2's accuracy and fidelity, and the cascade at its
configured default."""
import json

import numpy as np
import pytest

from build_engines import paths, runtime
from rtinfer.postprocess import softmax

from conftest import REPO
from helpers import cascade_policy

BIG_DIR = paths.BUILD / "big"


def confirm_split():
    """Lite2's logits and labels (stage big) and the installed Lite0's logits on the same photos (stage images)."""
    big = BIG_DIR / "logits_confirm.npz"
    labels_p = paths.IMAGES_DIR / "eval_labels.npy"
    if not big.exists() or not labels_p.exists():
        pytest.fail("not built: run `make engines`")
    if len(np.load(labels_p)) == 0:  # `make engines` without LABELED_DIR: agreement figures only
        pytest.skip("the build had no labeled photos (LABELED_DIR): no accuracy to guard")
    doc = np.load(big)
    y = np.load(labels_p)
    assert np.array_equal(doc["labels"], y), "stage big and stage images saw different confirm photos"
    small = runtime.logits(runtime.session(REPO / "classifier_onnx" / "1" / "model.onnx"),
                           np.load(paths.IMAGES_DIR / "eval.npy"))
    return small, doc["logits"], y


def test_lite2_manifest_figures():
    m = json.loads((REPO / "classifier_big" / "1" / "manifest.json").read_text())
    assert m["inputs"][0]["dtype"] == "uint8" and m["inputs"][0]["shape"][1:] == [260, 260, 3]
    confirm = m["figures"]["confirm"]
    assert confirm["top1_agreement"] == 1.0 and confirm["mean_kl"] < 1e-6  # ONNX == PyTorch original
    assert m["figures"]["fp16_confirm"]["top1_agreement"] >= 0.99
    if "top1_accuracy" not in confirm:
        pytest.skip("the build had no labeled photos (LABELED_DIR): agreement checked, no accuracy to guard")
    assert confirm["top1_accuracy"] >= 0.87, confirm  # measured 89.6 % on these 250 photos


def test_cascade_at_its_default_is_near_big_only_and_escalates_a_minority():
    small, big, y = confirm_split()
    escalate, _ = cascade_policy().decide(softmax(small))
    cascade = np.where(escalate, big.argmax(1), small.argmax(1))
    acc = lambda pred: float(np.mean(pred == y))
    big_only, small_only, both = acc(big.argmax(1)), acc(small.argmax(1)), acc(cascade)
    assert big_only > small_only  # the big model is worth asking (measured 89.6 % vs 86.8 %)
    assert both >= big_only - 0.010, (both, big_only)  # goal 0.5 point on choose; 1 point of slack here
    assert escalate.mean() <= 0.25, escalate.mean()  # measured 13.6 %
