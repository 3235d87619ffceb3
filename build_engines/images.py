"""Deterministic calibration and evaluation image sets.

Source: real colour photos shipped in scikit-image's `data/` and matplotlib's
`grace_hopper.jpg`, expanded with seeded random crops and flips. The two splits use
different seeds and are checked disjoint (no identical 224x224 image in both). Users
may pass their own folders instead. Images are stored as uint8 224x224 RGB, already
resized exactly as the served preprocess does, so `to_batch` only normalizes.
"""
from pathlib import Path

import numpy as np
from PIL import Image

from .hashing import sha256_file
from .paths import IMAGE_SIZE

SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
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
    return np.asarray(img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.uint8)


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
    """A user's folder, each whole image resized like the server does (no augmentation)."""
    return np.stack([_resize(Image.open(f)) for f in files[:n]])


def disjoint(calib: np.ndarray, eval_: np.ndarray) -> np.ndarray:
    """Drop calibration images identical to an evaluation image, so the splits never share one."""
    seen = {x.tobytes() for x in eval_}
    keep = [i for i, x in enumerate(calib) if x.tobytes() not in seen]
    return calib[keep]


def to_batch(images: np.ndarray) -> np.ndarray:
    """uint8 [N,224,224,3] -> float32 NCHW with the model's (x-127)/128 normalization."""
    return np.ascontiguousarray(((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2))
