"""A pool of augmented views with the teacher's answers cached: the teacher runs once per view, not per step.

Each view is a seeded random box of a photo (+ flip); the student's copy is stored at the training
resolution, the teacher scores the same box at its own size (224 for Lite0, 260 for Lite2) through
ONNX Runtime (its exported graph: faster than PyTorch here, and the very model the build measures against).
The first views of every photo are the served centre crop itself, so the student also learns the test-time view.
Labels ride along (-1 for unlabeled photos). Saved as one .npz, rebuilt only when its inputs change.
"""
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rtinfer import imaging

from .. import evaluate
from ..paths import IMAGE_SIZE
from . import augment


def build_pool(files: list, labels: list, teacher_onnx: Path, views: int, size: int, seed: int,
               out: Path, chunk: int = 32, teacher_size: int = IMAGE_SIZE) -> dict:
    """``views`` per photo: the served centre crop, then random resized crops/flips. Returns the pool arrays.
    ``teacher_onnx``: FP32 NCHW graph taking ``teacher_size`` px (each teacher sees its model-card crop)."""
    rng = np.random.default_rng(seed)
    xs, ys, ts, t0 = [], [], [], time.perf_counter()
    pending_s, pending_t = [], []

    def flush():
        if pending_t:
            ts.append(evaluate.run(teacher_onnx, imaging.normalize(np.stack(pending_t))))
            xs.append(np.stack(pending_s))
            pending_s.clear(), pending_t.clear()

    for i, (f, y) in enumerate(zip(files, labels)):
        img = augment.photo(f)
        for v in range(views):
            if v == 0:   # exactly what the server feeds the classifier
                data = Path(f).read_bytes()
                centre = imaging.preprocess(data)
                pending_t.append(centre if teacher_size == IMAGE_SIZE else imaging.preprocess(data, size=teacher_size))
                student_view = Image.fromarray(centre).resize((size, size), Image.BICUBIC)
                pending_s.append(np.asarray(student_view, dtype=np.uint8))
            else:
                box, flip = augment.random_box(*img.size, rng), bool(rng.random() < 0.5)
                pending_t.append(augment.view(img, box, flip, teacher_size))
                pending_s.append(augment.view(img, box, flip, size))
            ys.append(int(y))
        if len(pending_t) >= chunk:
            flush()
        if (i + 1) % 50 == 0 or i + 1 == len(files):
            dt = time.perf_counter() - t0
            print(f"  [distill] teacher pool {i + 1}/{len(files)} photos, {dt:.0f} s, "
                  f"ETA {dt / (i + 1) * (len(files) - i - 1):.0f} s", flush=True)
    flush()
    pool = {"x": np.concatenate(xs), "teacher": np.concatenate(ts).astype(np.float32),
            "y": np.array(ys, dtype=np.int64)}
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, **pool)
    tmp.replace(out)
    return pool


def load_pool(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
