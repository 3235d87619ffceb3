"""The input contract: classifier graphs take UINT8 RGB [N,224,224,3] and normalize inside.

Preprocess then hands the classifier 150 KB per image instead of 600 KB of float32, and
every runtime (ONNX Runtime on CPU, TensorRT on GPU) does the normalization next to the
first convolution. The build works on FP32 NCHW graphs internally and puts this front
on each deliverable: Cast -> (x - 127) * (1/128) -> Transpose to NCHW, bit-exact with
``rtinfer.imaging.normalize`` (1/128 is a power of two).
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .paths import IMAGE_SIZE, INPUT_NAME

INNER = "input_nchw_float"


def has_front(model: onnx.ModelProto) -> bool:
    inp = next(i for i in model.graph.input if i.name == INPUT_NAME)
    return inp.type.tensor_type.elem_type == TensorProto.UINT8


def add_front(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``input`` is UINT8 NHWC; the old FP32 NCHW input becomes internal
    (its spatial size is kept: 224 for Lite0, 260 for Lite2)."""
    if has_front(model):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    old = next(i for i in g.input if i.name == INPUT_NAME)
    float_type = old.type.tensor_type.elem_type
    for node in g.node:
        node.input[:] = [INNER if n == INPUT_NAME else n for n in node.input]
    g.input.remove(old)
    batch = old.type.tensor_type.shape.dim[0]
    dims = old.type.tensor_type.shape.dim
    size = dims[2].dim_value if len(dims) == 4 and dims[2].dim_value else IMAGE_SIZE
    new = helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [None, size, size, 3])
    new.type.tensor_type.shape.dim[0].CopyFrom(batch)
    g.input.insert(0, new)
    np_type = onnx.helper.tensor_dtype_to_np_dtype(float_type)
    g.initializer.extend([numpy_helper.from_array(np.array(127.0, dtype=np_type), "front_mean"),
                          numpy_helper.from_array(np.array(1.0 / 128.0, dtype=np_type), "front_scale")])
    front = [
        helper.make_node("Cast", [INPUT_NAME], ["front_float"], to=float_type, name="front_cast"),
        helper.make_node("Sub", ["front_float", "front_mean"], ["front_centred"], name="front_sub"),
        helper.make_node("Mul", ["front_centred", "front_scale"], ["front_scaled"], name="front_mul"),
        helper.make_node("Transpose", ["front_scaled"], [INNER], perm=[0, 3, 1, 2], name="front_nchw"),
    ]
    nodes = front + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return m


def wrap_file(src: Path, dst: Path) -> Path:
    """``src`` with the UINT8 front, saved to ``dst`` (may be the same path)."""
    model = add_front(onnx.load(str(src)))
    onnx.checker.check_model(model)
    tmp = Path(dst).with_suffix(".front.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    return Path(dst)
