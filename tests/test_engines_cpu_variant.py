"""The installed CPU variant: within budget, known answers, manifest matching the file."""
import json

import numpy as np
import onnx
import pytest

from build_engines import evaluate, images, paths
from build_engines.fidelity import top1_agreement
from build_engines.hashing import sha256_file
from build_engines.sanity import check_sanity
from build_engines.source_model import weights_sha256

MODEL = paths.CPU_MODEL_DIR / "model.onnx"
MANIFEST = paths.CPU_MODEL_DIR / "manifest.json"


@pytest.fixture(scope="module")
def manifest():
    if not MODEL.exists() or not MANIFEST.exists():
        pytest.fail("CPU variant not installed: run `make engines` (make test does it first)")
    return json.loads(MANIFEST.read_text())


def test_manifest_matches_the_file(manifest):
    assert manifest["sha256"] == sha256_file(MODEL)
    assert manifest["size_bytes"] == MODEL.stat().st_size
    assert manifest["source_weights_sha256"] == weights_sha256()
    assert manifest["producer_command"].startswith("python -m build_engines")
    assert manifest["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]
    assert manifest["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 1000]}]
    assert manifest["precision"] and manifest["variant"]


def test_cpu_variant_meets_budget_on_eval_split(manifest):
    x = images.to_batch(np.load(paths.IMAGES_DIR / "eval.npy"))
    ref = evaluate.run(paths.SOURCE_DIR / "model.onnx", x)
    out = evaluate.run(MODEL, x)
    agreement = top1_agreement(ref, out)
    assert agreement >= manifest["figures"]["budget"] >= 0.97
    assert agreement == pytest.approx(manifest["figures"]["top1_agreement"], abs=0.005)


def test_cpu_variant_knows_the_cat_and_the_espresso(manifest):
    result = check_sanity(MODEL)
    assert 281 <= result["chelsea"] <= 285 and result["coffee"] == 967


def test_cpu_variant_is_the_build_choice(manifest):
    built = json.loads((paths.CPU_DIR / "manifest.json").read_text())
    assert built["sha256"] == manifest["sha256"]
    log = json.loads((paths.CPU_DIR / "cpu_log.json").read_text())
    assert manifest["variant"] == log["chosen"]
    within = {k: v for k, v in log["candidates"].items() if v["meets_budget"]}
    fastest = max(v["b8"] for v in within.values())
    assert log["chosen"] in within
    assert within[log["chosen"]]["b8"] >= 0.95 * fastest             # the fastest within budget, up to noise
    assert not any(v["b8"] > fastest * 0.95 and v["top1_agreement"] > within[log["chosen"]]["top1_agreement"]
                   for v in within.values())                         # and among ties, the most faithful


def test_portable_file_for_gpu_hosts(manifest):
    """The default (GPU/NGC) config loads the chosen candidate before ORT's CPU-only fusions: standard
    ONNX domains only, listed in the manifest, and the same answers as the CPU file."""
    portable = paths.CPU_MODEL_DIR / manifest["portable"]["artifact"]
    assert manifest["portable"]["sha256"] == sha256_file(portable)
    graph = onnx.load(str(portable))
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    assert "com.microsoft" in {n.domain for n in onnx.load(str(MODEL)).graph.node}  # fused: why two files
    x = images.to_batch(np.load(paths.IMAGES_DIR / "eval.npy"))[:32]
    assert top1_agreement(evaluate.run(MODEL, x), evaluate.run(portable, x)) >= 0.97
    from tritonclient.grpc import model_config_pb2
    from google.protobuf import text_format
    default = text_format.Parse((paths.CPU_MODEL_DIR.parent / "config.pbtxt").read_text(),
                                model_config_pb2.ModelConfig())
    assert default.default_model_filename == portable.name
