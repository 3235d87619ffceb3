"""Static cost of an ONNX graph: parameters and multiply-accumulates per image.

Counted from the graph itself (Conv and Gemm/MatMul weights, shapes from ONNX shape
inference at batch 1), so pruned and quantized variants are measured the same way.
FLOPs are reported as 2 x MACs.
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

_QDQ = {"QuantizeLinear", "DequantizeLinear"}


def _fix_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        d = vi.type.tensor_type.shape.dim
        if d and d[0].dim_param:
            d[0].dim_value = 1
    del m.graph.value_info[:]
    return shape_inference.infer_shapes(m)


def _shapes(model: onnx.ModelProto) -> dict:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.dim_value > 0 for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _weight_shape(name: str, shapes: dict, producers: dict) -> list | None:
    """Shape of a weight input, looking through a DequantizeLinear (Q/DQ graphs)."""
    if name in shapes:
        return shapes[name]
    node = producers.get(name)
    if node is not None and node.op_type in _QDQ | {"Cast"}:
        return _weight_shape(node.input[0], shapes, producers)
    return None


def macs(model: onnx.ModelProto) -> int:
    return sum(node_macs(model).values())


def node_macs(model: onnx.ModelProto) -> dict:
    """Multiply-accumulates per image of each Conv/Gemm/MatMul node, by node name."""
    m = _fix_batch(model)
    shapes = _shapes(m)
    producers = {o: n for n in m.graph.node for o in n.output}
    per_node = {}
    for n in m.graph.node:
        total = 0
        if n.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w_in = n.input[3] if n.op_type == "QLinearConv" else n.input[1]
            w = _weight_shape(w_in, shapes, producers)
            y = shapes.get(n.output[0])
            if w and y:
                total += int(np.prod(y[1:])) * int(np.prod(w[1:]))   # out elems x (Cin/g * kh * kw)
        elif n.op_type in ("Gemm", "MatMul"):
            w = _weight_shape(n.input[1], shapes, producers)
            y = shapes.get(n.output[0])
            if w and y:
                k = w[1] if (n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)) else w[0]
                total += int(np.prod(y[1:])) * int(k)
        if total:
            per_node[n.name] = total
    return per_node


def params(model: onnx.ModelProto) -> int:
    """Elements of weight tensors; Q/DQ scales and zero points are bookkeeping, not parameters."""
    qparams = {n.input[i] for n in model.graph.node if n.op_type in _QDQ for i in (1, 2) if i < len(n.input)}
    return int(sum(np.prod(i.dims) for i in model.graph.initializer
                   if i.name not in qparams and len(i.dims) > 0 and np.prod(i.dims) > 1
                   and i.data_type != onnx.TensorProto.INT64))


def summary(path: Path) -> dict:
    m = onnx.load(str(path))
    mac = macs(m)
    return {"params": params(m), "macs": mac, "gflops": 2 * mac / 1e9, "size_bytes": Path(path).stat().st_size}
