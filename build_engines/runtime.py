"""ONNX Runtime sessions configured identically for every candidate, so comparisons are fair."""
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .paths import INPUT_NAME, OUTPUT_NAME

THREADS = int(os.environ.get("ENGINES_THREADS", "0")) or (os.cpu_count() or 1)
_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def session(model, threads: int = THREADS, level: str = "all", optimized_path: Path | None = None):
    """`model` is a path or serialized bytes. `optimized_path` saves ORT's optimized graph offline."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = _LEVELS[level]
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, (bytes, bytearray)) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def as_input(sess, x: np.ndarray) -> np.ndarray:
    """Images for this session's input: float32 NCHW for the build's internal graphs, UINT8 NHWC for
    deliverables (``uint8_front``). The float images came from uint8 by (x-127)/128, so the inverse is exact."""
    if sess.get_inputs()[0].type == "tensor(uint8)" and x.dtype != np.uint8:
        return np.ascontiguousarray(np.rint(x * 128.0 + 127.0).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
    return x


def logits(sess, x: np.ndarray, batch: int = 16, outputs: list | None = None) -> np.ndarray:
    """Run float32 NCHW `x` in chunks; returns the `logits` output (or the named outputs as a list)."""
    x = as_input(sess, x)
    names = outputs or [OUTPUT_NAME]
    parts = [sess.run(names, {INPUT_NAME: x[i:i + batch]}) for i in range(0, len(x), batch)]
    if outputs is None:
        return np.concatenate([p[0] for p in parts])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
