"""What we check in an ONNX file before TensorRT sees it, so mistakes surface on any host.

A strongly typed network takes every tensor type from the ONNX file, inputs and
outputs included, so an FP16 export without FP32 casts at its edges would give an
engine that Triton refuses (its config says TYPE_FP32). We catch that here, with
the names, ranks and a dynamic batch axis, rather than after a long GPU build.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .opt_profile import ONNX_ELEM_TYPE, dtype_name


def _dims(vi) -> list:
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in vi.type.tensor_type.shape.dim]


def _check_tensor(kind: str, vi, want, batched: bool, max_batch: int) -> list[str]:
    errors = []
    want_type = ONNX_ELEM_TYPE.get(dtype_name(want.data_type))
    got_type = vi.type.tensor_type.elem_type
    if got_type != want_type:
        errors.append(f"{kind} {vi.name!r} is {onnx.TensorProto.DataType.Name(got_type)} in the ONNX but "
                      f"{dtype_name(want.data_type)} in the Triton config (a strongly typed engine keeps the "
                      f"ONNX types: export with FP32 casts at the inputs and outputs)")
    dims = _dims(vi)
    want_dims = list(want.dims)
    if batched:
        if not dims:
            return errors + [f"{kind} {vi.name!r} has no shape in the ONNX"]
        batch, dims = dims[0], dims[1:]
        if isinstance(batch, int) and batch > 0 and not batch == max_batch == 1:
            errors.append(f"{kind} {vi.name!r} has a fixed batch dimension {batch}; export with a dynamic batch "
                          f"axis (Triton sends batches of 1..{max_batch})")
    if len(dims) != len(want_dims) or any(isinstance(d, int) and d != w for d, w in zip(dims, want_dims)):
        errors.append(f"{kind} {vi.name!r} has dims {dims} (after the batch axis) in the ONNX, "
                      f"{want_dims} in the Triton config")
    return errors


def check_io(onnx_path: Path, cfg) -> None:
    """Raise ValueError listing every difference between the ONNX graph's I/O and the Triton config's."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    graph_in = {v.name: v for v in model.graph.input if v.name not in inits}
    graph_out = {v.name: v for v in model.graph.output}
    batched = cfg.max_batch_size > 0
    errors = []
    for kind, have, want in (("input", graph_in, cfg.input), ("output", graph_out, cfg.output)):
        want_names = {w.name for w in want}
        if set(have) != want_names:
            errors.append(f"{kind}s are {sorted(have)} in the ONNX, {sorted(want_names)} in the Triton config")
        for w in want:
            if w.name in have:
                errors += _check_tensor(kind, have[w.name], w, batched, cfg.max_batch_size)
    if errors:
        raise ValueError(f"{onnx_path} does not match model {cfg.name!r}:\n  " + "\n  ".join(errors))


def is_2to4_sparse(weight: np.ndarray) -> bool:
    """True if every group of 4 consecutive input channels of a Conv weight [K, C, R, S] holds at
    most 2 non-zeros: the pattern sparse tensor cores use."""
    if weight.ndim < 2 or weight.shape[1] % 4:
        return False
    w = np.moveaxis(weight, 1, -1).reshape(-1, weight.shape[1] // 4, 4)
    return bool(np.all(np.count_nonzero(w, axis=-1) <= 2))


def has_2to4_sparse_weights(onnx_path: Path) -> bool:
    """Whether the file has any 2:4-sparse Conv weight, i.e. whether SPARSE_WEIGHTS can pay off.

    Looks through DequantizeLinear (Q/DQ files keep INT8 weights as initializers)."""
    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def weight(name: str):
        for _ in range(4):
            if name in inits:
                return numpy_helper.to_array(inits[name])
            node = producers.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear", "Cast"):
                return None
            name = node.input[0]
        return None

    for node in model.graph.node:
        if node.op_type == "Conv":
            w = weight(node.input[1])
            if w is not None and w.size >= 64 and is_2to4_sparse(w):
                return True
    return False
