"""Deterministic calibration and evaluation image sets.

Labeled photos (``--labeled-dir``, ImageNet names, see rtinfer.labeled_photos) are split by class:
the build chooses on one half and confirms on the other. Without them, the source is
real colour photos shipped in scikit-image's `data/` and matplotlib's `grace_hopper.jpg`,
expanded with seeded random crops and flips; the two splits use different seeds and are
checked disjoint (no identical 224x224 image in both), and only agreement with the
original can be measured. Users may pass their own unlabeled folders too. Images are
stored as uint8 224x224 RGB, produced by the served preprocess code (rtinfer.imaging,
from the file's bytes where there is a file), so `to_batch` only normalizes.
"""
from pathlib import Path

import numpy as np
from PIL import Image

from rtinfer import imaging
from rtinfer.labeled_photos import IMAGE_EXTS  # what the server accepts: JPEG, PNG

from .hashing import sha256_file
from .preprocess import to_uint8

SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg"]
CALIB_SEED, EVAL_SEED = 1001, 2002


def packaged_photos() -> list[Path]:
    import matplotlib
    import skimage
    sk = Path(skimage.__file__).parent / "data"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    return [sk / n for n in SKIMAGE_PHOTOS] + [mpl / "grace_hopper.jpg"]


def folder_images(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SystemExit(f"no images found in {folder}")
    return files


def source_fingerprint(files: list[Path]) -> list:
    """What the image set depends on: the bytes of every source file."""
    return [[f.name, sha256_file(f)] for f in files]


def _resize(img: Image.Image) -> np.ndarray:
    return to_uint8(img)


def _random_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """ImageNet-style random resized crop (10-100 % area, aspect 3/4..4/3) with a coin-flip mirror."""
    w, h = img.size
    for _ in range(20):
        area = rng.uniform(0.10, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 16 <= cw <= w and 16 <= ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x, y, x + cw, y + ch))
            break
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def expanded_set(files: list[Path], n: int, seed: int, include_full: bool) -> np.ndarray:
    """n images: optionally each full photo (and its mirror) first, then seeded crops round-robin over photos."""
    photos = [Image.open(f).convert("RGB") for f in files]
    out = []
    if include_full:
        for p in photos:
            out += [_resize(p), _resize(p.transpose(Image.FLIP_LEFT_RIGHT))]
    rng = np.random.default_rng(seed)
    i = 0
    while len(out) < n:
        out.append(_resize(_random_crop(photos[i % len(photos)], rng)))
        i += 1
    return np.stack(out[:n])


def user_set(files: list[Path], n: int | None = None) -> np.ndarray:
    """A folder's images, each through the server's own preprocessing of the file's bytes (no augmentation)."""
    return np.stack([imaging.preprocess(Path(f).read_bytes()) for f in files[:n]])


def disjoint(calib: np.ndarray, eval_: np.ndarray) -> np.ndarray:
    """Drop calibration images identical to an evaluation image, so the splits never share one."""
    seen = {x.tobytes() for x in eval_}
    keep = [i for i, x in enumerate(calib) if x.tobytes() not in seen]
    return calib[keep]


def to_batch(images: np.ndarray) -> np.ndarray:
    """uint8 [N,224,224,3] -> float32 NCHW with the model's (x-127)/128 normalization."""
    return imaging.normalize(images)
