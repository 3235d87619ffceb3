"""End to end: what the server answers for labeled photos is what the installed model gives offline
under the same preprocessing, and real-world images (EXIF, 16-bit) are read as a user would expect."""
import io
import json

import numpy as np
from PIL import Image

from build_engines import paths
from clients import evaluate, samples
from clients.classify import PipelineClient
from rtinfer import labeled_photos, labels

CAT, ESPRESSO = 285, 967


def _labeled_folder(tmp_path):
    """ImageNet-named copies of the shipped photos, in both layouts, plus rotated and 16-bit versions."""
    w = labels.wnids()
    (tmp_path / w[ESPRESSO]).mkdir(parents=True)
    (tmp_path / w[ESPRESSO] / "coffee.jpg").write_bytes(samples.photo("coffee"))
    (tmp_path / f"{w[CAT]}_chelsea.jpg").write_bytes(samples.photo("chelsea"))
    (tmp_path / f"{w[CAT]}_chelsea_png.png").write_bytes(samples.photo("chelsea", "PNG"))
    return tmp_path


def test_labeled_folder_layouts(tmp_path):
    files, y = labeled_photos.find(_labeled_folder(tmp_path))
    assert [f.name for f in files] == ["n02124075_chelsea.jpg", "n02124075_chelsea_png.png", "coffee.jpg"]
    assert y.tolist() == [CAT, CAT, ESPRESSO]
    assert labeled_photos.split_of(CAT) == "choose" and labeled_photos.split_of(ESPRESSO) == "confirm"
    lo, hi = labeled_photos.wilson(88, 100)
    assert 0.80 < lo < 0.88 < hi < 0.94


def test_served_pipeline_equals_the_installed_model_offline(server, keyring_path, tmp_path):
    folder = _labeled_folder(tmp_path / "photos")
    out = tmp_path / "served.json"
    rc = evaluate.main(["--data", str(folder), "--split", "all", "--url", server.grpc_url, "--keyring",
                        str(keyring_path), "--reference", str(paths.CPU_MODEL_DIR / "model.onnx"),
                        "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["failed_requests"] == 0
    assert report["agreement_with_reference"] == 1.0          # server crop == offline crop, same classifier
    assert report["served"]["top5_accuracy"] == 1.0
    assert report["served"]["top1_accuracy"] == report["reference"]["top1_accuracy"]


def _classify(server, keys, data: bytes):
    c = PipelineClient(server.grpc_url, key=keys.key("k1"), key_id="k1", client_id="photos")
    try:
        return c.classify(data, top_k=5).predictions
    finally:
        c.close()


def test_exif_rotated_photo_is_classified_upright(server, keys):
    """A phone stores the pixels sideways and says so in EXIF: the answer must match the upright photo."""
    upright = Image.open(io.BytesIO(samples.photo("coffee")))
    exif = Image.Exif()
    exif[0x0112] = 6                                    # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    upright.transpose(Image.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    assert _classify(server, keys, buf.getvalue())[0].index == ESPRESSO


def test_sixteen_bit_png_is_not_clipped_to_white(server, keys):
    grey = np.asarray(Image.open(io.BytesIO(samples.photo("coffee"))).convert("L"), dtype=np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")              # 16-bit greyscale PNG
    eight = io.BytesIO()
    Image.fromarray((grey // 257).astype(np.uint8)).save(eight, "PNG")
    assert [p.index for p in _classify(server, keys, buf.getvalue())][:1] == \
        [p.index for p in _classify(server, keys, eight.getvalue())][:1]
