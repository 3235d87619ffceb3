"""Fidelity of a candidate against the original FP32 model, from the two models' logits."""
import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top1_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Fraction of images whose top-1 class is the same."""
    return float(np.mean(ref.argmax(1) == cand.argmax(1)))


def top5_overlap(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean fraction of the reference's top-5 classes that are also in the candidate's top-5."""
    a = np.argsort(-ref, axis=1)[:, :5]
    b = np.argsort(-cand, axis=1)[:, :5]
    return float(np.mean([len(set(x) & set(y)) / 5.0 for x, y in zip(a, b)]))


def mean_kl(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean KL(P_ref || P_cand) of the softmax distributions, in nats."""
    p, q = softmax(ref), softmax(cand)
    eps = 1e-12
    return float(np.mean(np.sum(p * (np.log(p + eps) - np.log(q + eps)), axis=1)))


def compare(ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Agreement with the original, and, when labels exist, accuracy (with 95 % intervals).

    ``quality`` is what budgets are checked against: with labels, 1 + (candidate's top-1
    accuracy - the original's on the same images), so a budget of 0.99 means "at most one
    point of top-1 lost"; without labels, top-1 agreement with the original."""
    out = {"top1_agreement": top1_agreement(ref, cand), "top5_overlap": top5_overlap(ref, cand),
           "mean_kl": mean_kl(ref, cand), "n_images": int(len(ref))}
    if labels is None:
        return out | {"quality": out["top1_agreement"], "quality_basis": "agreement"}
    from rtinfer.labeled_photos import accuracy
    mine, orig = accuracy(cand, labels), accuracy(ref, labels)
    return out | mine | {"original_top1_accuracy": orig["top1_accuracy"],
                         "quality": 1.0 + mine["top1_accuracy"] - orig["top1_accuracy"], "quality_basis": "accuracy"}
