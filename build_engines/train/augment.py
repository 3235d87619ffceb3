"""Augmentation so a few hundred photos go far: random resized crops + flips, then mixup/cutmix per batch.

A view is cut once as a box on the photo; the student gets it at the training resolution and the
teacher the same box at 224 (teachers are best at the size they were trained for), so the
teacher's answer can be computed once and cached (`teacher.py`). Mixup and cutmix then mix
images and targets together in the batch: the mixed target is the area/lambda-weighted mix of the
two cached teacher distributions (an approximation of the teacher on the mixed image).
"""
import numpy as np
import torch
from PIL import Image

from rtinfer import imaging

SCALE = (0.25, 1.0)       # of the photo's area; milder than ImageNet's 0.08: the test crop shows most of the photo
RATIO = (3 / 4, 4 / 3)


def photo(path) -> Image.Image:
    """Decoded like the server does (EXIF, RGB), uncropped."""
    from pathlib import Path
    return imaging.to_rgb(imaging.decode(Path(path).read_bytes(), draft=False))


def random_box(w: int, h: int, rng: np.random.Generator) -> tuple:
    for _ in range(20):
        area = rng.uniform(*SCALE) * w * h
        aspect = np.exp(rng.uniform(np.log(RATIO[0]), np.log(RATIO[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 8 <= cw <= w and 8 <= ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def view(img: Image.Image, box: tuple, flip: bool, size: int) -> np.ndarray:
    """uint8 HWC crop of ``box`` resized to ``size`` (bicubic, as the served transform)."""
    v = img.resize((size, size), Image.BICUBIC, box=box)
    if flip:
        v = v.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(v, dtype=np.uint8)


def mix(x: torch.Tensor, targets: list, rng: np.random.Generator, p_mixup: float = 0.25,
        p_cutmix: float = 0.25, beta: float = 1.0) -> tuple:
    """Mixup (whole images) or cutmix (a box of one pasted into another) with probability
    ``p_mixup`` / ``p_cutmix``, else unchanged. ``targets``: [N, C] tensors mixed the same way."""
    r = rng.random()
    if r >= p_mixup + p_cutmix:
        return x, targets
    lam = float(rng.beta(beta, beta))
    perm = torch.from_numpy(rng.permutation(len(x)))
    if r < p_mixup:
        x = lam * x + (1 - lam) * x[perm]
    else:
        h, w = x.shape[2:]
        ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, [None if t is None else lam * t + (1 - lam) * t[perm] for t in targets]
