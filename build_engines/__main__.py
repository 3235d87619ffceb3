"""`python -m build_engines`: run every stage of `make engines`, skipping those already up to date."""
import argparse
import time
from pathlib import Path

from . import paths
from .hashing import code_hash, sha256_file
from .install import MANIFEST as INSTALLED_MANIFEST, MODEL as INSTALLED_MODEL, install
from .manifest import write_manifest
from .sanity import check_sanity
from .stages import run_stage, stage_key
from . import source_model


def stage_source(weights_sha: str) -> Path:
    out = paths.SOURCE_DIR / "model.onnx"
    man = paths.SOURCE_DIR / "manifest.json"

    def build():
        source_model.export(out)
        sanity = check_sanity(out)
        write_manifest(out, man, source_weights_sha256=weights_sha, precision="fp32", variant="source",
                       extra={"opset": 17, "sanity": sanity})
        print(f"[source] exported {out} ({out.stat().st_size / 1e6:.1f} MB), sanity {sanity}", flush=True)

    run_stage("source", paths.SOURCE_DIR, {
        "weights": weights_sha, "code": code_hash("source_model", "graph_clean", "manifest", "sanity", "preprocess"),
        "opset": 17}, [out, man], build)
    return out


def stage_install(artifact: Path, weights_sha: str, precision: str, variant: str,
                  figures: dict | None = None, extra: dict | None = None) -> None:
    run_stage("install", paths.BUILD / "install", {
        "artifact": sha256_file(artifact), "variant": variant, "precision": precision,
        "figures": figures or {}, "extra": extra or {},
        "code": code_hash("install", "manifest", "sanity", "preprocess")},
        [INSTALLED_MODEL, INSTALLED_MANIFEST],
        lambda: install(artifact, weights_sha=weights_sha, precision=precision, variant=variant,
                        figures=figures or {}, extra=extra or {}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m build_engines", description=__doc__)
    ap.add_argument("--calib-dir", type=Path, help="folder of images for INT8 calibration (default: packaged photos)")
    ap.add_argument("--eval-dir", type=Path, help="folder of images for fidelity evaluation (default: packaged photos)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    weights_sha = source_model.weights_sha256()
    src = stage_source(weights_sha)
    stage_install(src, weights_sha, "fp32", "source")
    print(f"[engines] finished in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
