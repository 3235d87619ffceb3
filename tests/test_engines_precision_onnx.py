"""The precision-explicit ONNX files handed to the TensorRT stage: paths, I/O contract, precisions."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from build_engines import evaluate, images, paths
from build_engines.hashing import sha256_file

FP16 = paths.FP16_DIR / "model.onnx"
QDQ = paths.INT8_TRT_DIR / "model.onnx"


@pytest.fixture(scope="module", params=[FP16, QDQ], ids=["fp16", "int8_trt"])
def model(request):
    if not request.param.exists():
        pytest.fail(f"{request.param} missing: run `make engines`")
    return request.param


def test_io_contract_is_uint8_input_and_fp32_logits(model):
    m = onnx.load(str(model))
    (inp,), (out,) = m.graph.input, m.graph.output
    assert (inp.name, inp.type.tensor_type.elem_type) == ("input", onnx.TensorProto.UINT8)
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [224, 224, 3]
    assert (out.name, out.type.tensor_type.elem_type) == ("logits", onnx.TensorProto.FLOAT)
    man = json.loads((model.parent / "manifest.json").read_text())
    assert man["sha256"] == sha256_file(model)
    assert man["inputs"] == [{"name": "input", "dtype": "uint8", "shape": ["batch", 224, 224, 3]}]


@pytest.fixture(scope="module")
def eval_reference():
    """The evaluation split and the FP32 original's answers on it (what the build scored against)."""
    x = images.to_batch(np.load(paths.IMAGES_DIR / "eval.npy"))
    y = np.load(paths.IMAGES_DIR / "eval_labels.npy")
    return x, evaluate.Reference(evaluate.run(paths.SOURCE_DIR / "model.onnx", x), y if len(y) else None)


def test_recorded_fidelity_is_what_the_file_gives_and_within_budget(model, eval_reference):
    """The figures the manifest records for this lower-precision file are re-measured on the evaluation
    split (ONNX Runtime, as the build measured them) and the file meets the build's quality budget."""
    x, ref = eval_reference
    fig = json.loads((model.parent / "manifest.json").read_text())["figures"]
    got = evaluate.score(model, x, ref)
    assert got["quality_basis"] == fig["quality_basis"]
    for key in ("quality", "top1_agreement", "top5_overlap"):
        assert got[key] == pytest.approx(fig[key], abs=0.005), key
    assert got["quality"] >= fig["budget"], (got["quality"], fig["budget"])


def test_fp16_weights_are_fp16():
    m = onnx.load(str(FP16))
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in m.graph.initializer}
    assert convs and all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in convs)


def test_tensorrt_qdq_is_symmetric_int8():
    m = onnx.load(str(QDQ))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    qs = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qs, "no Q/DQ nodes"
    for n in qs:
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        if zp is not None and zp.dtype in (np.int8, np.uint8):
            assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: TensorRT needs int8 zero point 0"
