"""Install the chosen CPU variant where the server loads it, under the contract's names."""
import shutil
from pathlib import Path

from .manifest import write_manifest
from .paths import CPU_MODEL_DIR
from .sanity import check_sanity

MODEL = CPU_MODEL_DIR / "model.onnx"
MANIFEST = CPU_MODEL_DIR / "manifest.json"


def install(artifact: Path, *, weights_sha: str, precision: str, variant: str, figures: dict, extra: dict) -> None:
    CPU_MODEL_DIR.mkdir(parents=True, exist_ok=True)
    tmp = MODEL.with_suffix(".onnx.tmp")
    shutil.copyfile(artifact, tmp)
    tmp.replace(MODEL)   # atomic: a server polling the repository never sees half a file
    sanity = check_sanity(MODEL)
    write_manifest(MODEL, MANIFEST, source_weights_sha256=weights_sha, precision=precision, variant=variant,
                   figures=figures, extra={**extra, "sanity": sanity, "built_from": str(artifact)})
    print(f"[install] {variant} ({precision}) -> {MODEL}  sanity {sanity}", flush=True)
