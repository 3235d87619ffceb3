"""Manifest JSON next to every artifact: provenance (weights, command) plus the artifact's own hash."""
import json
import sys
from pathlib import Path

import onnx

from .hashing import sha256_file


def _io(model_path: Path) -> dict:
    m = onnx.load(str(model_path), load_external_data=False)

    def desc(vi):
        t = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}
    inits = {i.name for i in m.graph.initializer}
    return {"inputs": [desc(v) for v in m.graph.input if v.name not in inits],
            "outputs": [desc(v) for v in m.graph.output]}


def producer_command() -> str:
    return " ".join(["python -m build_engines"] + sys.argv[1:])


def write_manifest(artifact: Path, manifest: Path, *, source_weights_sha256: str, precision: str,
                   variant: str, figures: dict | None = None, extra: dict | None = None) -> dict:
    data = {
        "artifact": artifact.name,
        "variant": variant,
        "precision": precision,
        "source_weights_sha256": source_weights_sha256,
        "producer_command": producer_command(),
        **_io(artifact),
        "size_bytes": artifact.stat().st_size,
        "sha256": sha256_file(artifact),
    }
    if figures:
        data["figures"] = figures
    if extra:
        data.update(extra)
    manifest.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return data
