"""Install the chosen CPU variant where the server loads it, under the contract's names.

Two files: ``model.onnx`` is saved after ONNX Runtime's offline optimizations (CPU-only
fused ops such as com.microsoft FusedConv, tied to this ORT version) and is what CPU hosts
load (``configs/cpu.pbtxt``); ``model.portable.onnx`` is the same candidate before them,
standard ONNX (+ Q/DQ) only, which the default config loads, so the NGC container's native
backend (another ORT version, CUDA EP) gets a graph it can place on the GPU.
"""
from pathlib import Path

from .hashing import sha256_file
from .installed import MANIFEST, MODEL, PORTABLE
from .manifest import write_manifest
from .paths import CPU_MODEL_DIR
from .sanity import check_sanity
from .uint8_front import wrap_file


def install(artifact: Path, *, portable: Path, weights_sha: str, precision: str, variant: str, figures: dict,
            extra: dict) -> None:
    CPU_MODEL_DIR.mkdir(parents=True, exist_ok=True)
    wrap_file(artifact, MODEL)      # a no-op re-save when the artifact has the UINT8 front already
    wrap_file(portable, PORTABLE)   # the candidate before ORT's fusions, with the UINT8 input contract
    sanity = check_sanity(MODEL)
    portable_info = {"artifact": PORTABLE.name, "sha256": sha256_file(PORTABLE), "size_bytes": PORTABLE.stat().st_size,
                     "sanity": check_sanity(PORTABLE), "built_from": str(portable),
                     "loaded_by": "config.pbtxt (GPU hosts, NGC container)"}
    write_manifest(MODEL, MANIFEST, source_weights_sha256=weights_sha, precision=precision, variant=variant,
                   figures=figures, extra={**extra, "sanity": sanity, "built_from": str(artifact),
                                           "loaded_by": "configs/cpu.pbtxt (CPU hosts)", "portable": portable_info})
    print(f"[install] {variant} ({precision}) -> {MODEL}  sanity {sanity}", flush=True)
