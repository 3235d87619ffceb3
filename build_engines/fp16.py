"""Precision-explicit FP16 ONNX for a strongly typed TensorRT network.

Weights and activations become FP16; the graph's I/O stays as the contract says (UINT8
`input` with the normalizing front added by the build, FP32 `logits`, Casts inside). Numerically sensitive ops stay FP32
only where measurement says so: the fallbacks are tried in order, fewest FP32 ops first,
and the first that meets the budget on the evaluation split is kept.
"""
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnxconverter_common import float16

from . import evaluate

# Reductions and the logit layer accumulate over many terms; residual Adds carry the stream.
FALLBACKS = ([], ["GlobalAveragePool", "Gemm"], ["GlobalAveragePool", "Gemm", "Add"])


def convert(fp32: onnx.ModelProto, keep_fp32_ops: list) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "number truncated to 1e-07": tiny weights, expected in FP16
        return float16.convert_float_to_float16(fp32, keep_io_types=True, op_block_list=keep_fp32_ops or [])


def build(source: Path, out: Path, eval_x: np.ndarray, eval_ref: np.ndarray, budget: float) -> dict:
    model = onnx.load(str(source))
    tried = []
    for ops in FALLBACKS:
        m16 = convert(model, ops)
        onnx.checker.check_model(m16, full_check=True)
        onnx.save(m16, str(out))
        score = evaluate.score(out, eval_x, eval_ref)
        tried.append({"fp32_ops": ops, **score})
        print(f"  [fp16] FP32 ops {ops or 'none'}: eval quality {score['quality']:.3f} "
              f"KL {score['mean_kl']:.2e}", flush=True)
        if score["quality"] >= budget:
            return {"fp32_ops": ops, "tried": tried, "meets_budget": True}
    return {"fp32_ops": FALLBACKS[-1], "tried": tried, "meets_budget": False}
