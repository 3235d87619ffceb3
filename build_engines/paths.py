"""Where every artifact lives: one place, because other engineers depend on these paths."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Overridable so a scratch build never disturbs the shared build/ tree.
BUILD = Path(os.environ.get("ENGINES_BUILD_DIR", ROOT / "build" / "engines")).resolve()
REPO = ROOT / "model_repository"

SOURCE_DIR = BUILD / "source"
PRUNED_DIR = BUILD / "pruned"
CPU_DIR = BUILD / "cpu"
FP16_DIR = BUILD / "fp16"
INT8_TRT_DIR = BUILD / "int8_trt"
REPORT_DIR = BUILD / "report"
IMAGES_DIR = BUILD / "images"

# Contract with the model repository / server: names and location must not change.
CPU_MODEL_DIR = REPO / "classifier_onnx" / "1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
