"""The cascade's cloud classifier: EfficientNet-Lite2 (260 px), exported, measured and installed.

Cheap on purpose (no pruning, no INT8 search): the big model is only asked when the edge
model is unsure, so its job is accuracy. One export serves the CPU classifier
(``classifier_big``), the FP16 ONNX the TensorRT stage takes, and distillation as a teacher.
Fidelity: the installed ONNX (UINT8 front, ONNX Runtime) against the PyTorch original on the
same crops; accuracy on the labeled photos' splits, through ``rtinfer.imaging`` at 260 px.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from rtinfer import imaging

from . import evaluate, fidelity, fp16, paths, runtime, source_model
from .manifest import write_manifest
from .sanity import check_sanity
from .uint8_front import wrap_file

NAME = "lite2"
SIZE = source_model.image_size(NAME)
MODEL_DIR = paths.REPO / "classifier_big" / "1"
MODEL = MODEL_DIR / "model.onnx"
MANIFEST = MODEL_DIR / "manifest.json"


def crops(files: list[Path]) -> np.ndarray:
    """The photos as the server's preprocessing makes them for this model (centre crop at 260)."""
    return np.stack([imaging.preprocess(Path(f).read_bytes(), size=SIZE) for f in files])


def torch_logits(x_uint8: np.ndarray) -> np.ndarray:
    """The PyTorch original on the same crops, normalized as the graph's front does."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_pretrained(source_model.MODELS[NAME][0],
                                         weights_path=str(source_model.weights_path(NAME))).eval()
    x = imaging.normalize(x_uint8)
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + 16])).numpy() for i in range(0, len(x), 16)])


def build(out_dir: Path, splits: dict[str, tuple[list[Path], np.ndarray | None]], budget: float) -> dict:
    """Export, FP16 ONNX for TensorRT, figures per split; install into the model repository."""
    fp32 = out_dir / "source.onnx"
    model, half = out_dir / "model.onnx", out_dir / "fp16.onnx"
    source_model.export(fp32, name=NAME)
    wrap_file(fp32, model)
    figures, xs = {}, {}
    for split, (files, labels) in splits.items():
        x = xs[split] = crops(files)
        ref = torch_logits(x)
        got = runtime.logits(runtime.session(model), x)
        figures[split] = fidelity.compare(ref, got, labels)
        np.savez_compressed(out_dir / f"logits_{split}.npz", logits=got,
                            labels=labels if labels is not None else np.zeros(0, np.int64))
    confirm_y = splits["confirm"][1]
    x_eval = imaging.normalize(xs["confirm"])  # fp16.build scores FP32 NCHW graphs
    ref = evaluate.Reference(runtime.logits(runtime.session(fp32), x_eval), confirm_y)
    half_log = fp16.build(fp32, half, x_eval, ref, budget)
    wrap_file(half, half)
    figures["fp16_confirm"] = evaluate.score(half, x_eval, ref)
    sanity = check_sanity(model)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    MODEL.write_bytes(model.read_bytes())
    weights = source_model.weights_sha256(NAME)
    write_manifest(MODEL, MANIFEST, source_weights_sha256=weights, precision="fp32", variant="efficientnet-lite2",
                   figures=figures,
                   extra={"input_size": SIZE, "preprocessing": f"shorter side to {SIZE + 32} (bicubic), centre "
                          f"{SIZE}x{SIZE}, (x-127)/128 in the graph", "sanity": sanity,
                          "fidelity_reference": "PyTorch original (efficientnet_lite_pytorch) on the same crops",
                          "fp16_for_tensorrt": {"path": str(half), "fp32_ops": half_log["fp32_ops"],
                                                "meets_budget": half_log["meets_budget"]},
                          "int8": "not built for Lite2 (optional; the cascade asks it rarely)"})
    write_manifest(half, out_dir / "fp16_manifest.json", source_weights_sha256=weights,
                   precision="fp16 (input uint8, logits fp32)", variant="lite2-fp16-for-tensorrt",
                   figures=figures["fp16_confirm"], extra={"fp32_ops": half_log["fp32_ops"]})
    (out_dir / "big_log.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    onnx.checker.check_model(onnx.load(str(model)))
    return figures
