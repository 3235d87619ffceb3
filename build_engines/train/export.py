"""A trained module -> the build's FP32 NCHW ONNX graph, cleaned and checked like the source export."""
import warnings
from pathlib import Path

import onnx
import torch

from ..graph_clean import clean_graph
from ..paths import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME


def to_onnx(model: torch.nn.Module, path: Path, opset: int = 17, clean: bool = True) -> Path:
    model.eval()
    raw = Path(path).with_name(Path(path).stem + ".raw.onnx")
    x = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(raw), opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, dynamo=False)
    m = onnx.load(str(raw))
    m = clean_graph(m) if clean else m
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    raw.unlink()
    return Path(path)
