"""Fidelity metrics on hand-made logits with known answers."""
import numpy as np
import pytest

from build_engines import fidelity


def test_top1_agreement_counts_matching_argmax():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    cand = np.array([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 9.0], [0.0, 1.0, 0.0]])
    assert fidelity.top1_agreement(ref, cand) == pytest.approx(0.5)


def test_top5_overlap_counts_shared_classes():
    ref = np.array([[10, 9, 8, 7, 6, 0, 0, 0]], dtype=float)          # top-5: 0..4
    cand = np.array([[10, 9, 8, 0, 0, 7, 6, 0]], dtype=float)         # top-5: 0,1,2,5,6 -> 3 shared
    assert fidelity.top5_overlap(ref, cand) == pytest.approx(3 / 5)
    assert fidelity.top5_overlap(ref, ref) == pytest.approx(1.0)


def test_kl_matches_closed_form():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    ref, cand = np.log(p)[None], np.log(q)[None] + 7.0      # a constant shift must not matter
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert fidelity.mean_kl(ref, cand) == pytest.approx(expected, rel=1e-9)
    assert fidelity.mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)


def test_kl_is_averaged_over_images():
    p, q = np.log([[0.5, 0.5], [0.5, 0.5]]), np.log([[0.5, 0.5], [0.9, 0.1]])
    one = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert fidelity.mean_kl(p, q) == pytest.approx(one / 2)


def test_compare_reports_all_metrics():
    ref = np.random.default_rng(0).standard_normal((6, 10))
    r = fidelity.compare(ref, ref)
    assert r == {"top1_agreement": 1.0, "top5_overlap": 1.0, "mean_kl": pytest.approx(0.0, abs=1e-12), "n_images": 6,
                 "quality": 1.0, "quality_basis": "agreement"}


def test_quality_with_labels_is_accuracy_relative_to_the_original():
    """Labels turn the budget into points of top-1 accuracy lost against the original, on the same images."""
    labels = np.array([0, 1, 2, 3])
    ref = np.eye(4)[[0, 1, 2, 0]]          # original: 3 of 4 right
    cand = np.eye(4)[[0, 1, 3, 3]]         # candidate: 3 of 4 right, other mistakes
    r = fidelity.compare(ref, cand, labels)
    assert r["top1_accuracy"] == 0.75 and r["original_top1_accuracy"] == 0.75
    assert r["quality"] == pytest.approx(1.0) and r["quality_basis"] == "accuracy"
    assert r["top1_agreement"] == 0.5
    worse = fidelity.compare(ref, np.eye(4)[[1, 1, 3, 3]], labels)
    assert worse["quality"] == pytest.approx(0.75)
