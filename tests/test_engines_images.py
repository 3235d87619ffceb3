"""Image sets: deterministic, disjoint splits, and user folders accepted."""
import numpy as np
from PIL import Image

from build_engines import images, paths


def test_expanded_set_is_deterministic_and_seed_dependent():
    files = images.packaged_photos()
    a = images.expanded_set(files, 24, seed=7, include_full=False)
    b = images.expanded_set(files, 24, seed=7, include_full=False)
    c = images.expanded_set(files, 24, seed=8, include_full=False)
    assert a.shape == (24, 224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_built_splits_are_disjoint():
    calib = np.load(paths.IMAGES_DIR / "calib.npy")
    ev = np.load(paths.IMAGES_DIR / "eval.npy")
    assert len(calib) >= 64 and len(ev) >= 100
    assert not {x.tobytes() for x in calib} & {x.tobytes() for x in ev}


def test_disjoint_drops_shared_images():
    ev = np.zeros((2, 4, 4, 3), np.uint8)
    ev[1] += 5
    calib = np.stack([ev[1], ev[1] + 1])
    assert np.array_equal(images.disjoint(calib, ev), calib[1:])


def test_user_folder_is_read_whole_and_normalized(tmp_path):
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (300, 200), color).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    files = images.folder_images(tmp_path)
    x = images.to_batch(images.user_set(files))
    assert x.shape == (2, 3, 224, 224)
    assert x[0, 0].max() == (255 - 127) / 128 and x[1, 2].max() == (255 - 127) / 128
