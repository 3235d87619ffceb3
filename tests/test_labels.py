"""The label file Triton serves is the package's class names, line for line."""
from rtinfer import labels
from rtinfer.server import ROOT


def test_label_file_matches_package():
    lines = (ROOT / "model_repository" / "pipeline" / "imagenet_labels.txt").read_text().splitlines()
    assert tuple(lines) == labels.names()
    assert lines[285] == "Egyptian Mau" and lines[967] == "espresso"
    assert not any(":" in name for name in lines)  # Triton's classification output is score:index:label
