"""Real photos shipped in packages (scikit-image, matplotlib), encoded as the bytes a client would send."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def photo(name: str, fmt: str = "JPEG") -> bytes:
    """One shipped photo as JPEG/PNG bytes: scikit-image's data.<name>() or matplotlib's grace_hopper."""
    if name == "grace_hopper":
        import matplotlib.cbook
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
            arr = np.asarray(Image.open(fh).convert("RGB"))
    else:
        from skimage import data
        arr = getattr(data, name)()
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format=fmt, quality=95)
    return buf.getvalue()


def write_samples(directory: str | Path, names=("chelsea", "coffee")) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        path = directory / f"{name}.jpg"
        path.write_bytes(photo(name))
        out.append(path)
    return out
