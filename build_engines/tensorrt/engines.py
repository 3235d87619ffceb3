"""TensorRT engines for the GPU classifiers: the last stage of `make engines`.

Builds ``model_repository/classifier_trt_fp16/1/model.plan`` from the FP16 ONNX and
``classifier_trt_int8/1/model.plan`` from the Q/DQ ONNX as *strongly typed* networks (and, given
``extra``, more engines: the cascade's ``classifier_big_trt_fp16`` from Lite2's FP16 ONNX):
the precisions come from the ONNX files themselves, which TensorRT 10 (Triton
containers) and 11 (no FP16/INT8 builder flags, no calibrators) both build.
Each engine's optimization profile is derived from its Triton config, so the
engine and the server agree on batch sizes by construction.

Where TensorRT or a GPU is missing (CPU hosts) the stage prints one line and
returns. Engines are rebuilt only when the ONNX, the profile, TensorRT, the GPU
or this code changes. Set TRT_ENGINES_PER_CC=1 to name plans per GPU architecture
(``model_sm86.plan``) for a repository shared by several GPU types; see
docs/gpu.md "Several GPU types sharing one repository".
TRT_SPARSE_WEIGHTS=1/0 forces the sparse-weights tactic on/off (default: on when
the ONNX has 2:4-sparse Conv weights). TRT_VERBOSE=1 shows TensorRT's own log.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..hashing import code_hash, sha256_file, sha256_json
from ..stages import run_stage
from . import gpu as gpu_info, progress
from .gpu import Gpu
from .onnx_checks import check_io, has_2to4_sparse_weights
from .opt_profile import TensorProfile, dtype_name, load_config, profile_from_config

MODELS = {"classifier_trt_fp16": "fp16", "classifier_trt_int8": "int8"}
SKIP_HINT = "build on a GPU host inside the Triton container"
# This subpackage's modules (code_hash names them by path): editing any of them rebuilds the engines.
CODE = ("tensorrt/engines", "tensorrt/opt_profile", "tensorrt/onnx_checks", "tensorrt/progress", "tensorrt/gpu")
# TensorRT DataType names -> Triton data types, to check the built engine against the config.
TRT_TO_TRITON = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT8": "TYPE_INT8",
                 "UINT8": "TYPE_UINT8", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL"}


@dataclass(frozen=True)
class Job:
    """One engine to build: everything decided before TensorRT is involved."""
    model: str
    precision: str
    onnx: Path
    config: object  # tritonclient ModelConfig
    profile: list[TensorProfile]
    plan: Path
    manifest: Path
    sparse_weights: bool

    def io(self) -> list[dict]:
        """The config's inputs and outputs as the engine must present them."""
        return [{"name": t.name, "mode": mode, "data_type": dtype_name(t.data_type), "dims": list(t.dims)}
                for mode, ts in (("INPUT", self.config.input), ("OUTPUT", self.config.output)) for t in ts]


def skip_line(reason: str) -> str:
    return f"TensorRT engines: skipped ({reason}; {SKIP_HINT})"


def availability():
    """(tensorrt module, Gpu, None) where engines can be built here, else (None, None, reason)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None, None, "TensorRT not installed"
    if not hasattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED"):
        return None, None, f"TensorRT {getattr(trt, '__version__', '?')} cannot build strongly typed networks"
    gpu = gpu_info.probe()
    if gpu is None:
        return None, None, "no CUDA GPU found"
    return trt, gpu, None


def file_names(gpu: Gpu | None, per_cc: bool) -> tuple[str, str]:
    """(plan, manifest) names in the version directory: Triton's default name, or one per architecture."""
    if per_cc:
        if gpu is None:
            raise ValueError("per-architecture file names need the GPU")
        return f"model_{gpu.sm}.plan", f"manifest_{gpu.sm}.json"
    return "model.plan", "manifest.json"


def _sparse_choice(onnx_path: Path, override: bool | None) -> bool:
    env = os.environ.get("TRT_SPARSE_WEIGHTS", "auto").lower()
    if override is not None:
        return override
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return has_2to4_sparse_weights(onnx_path)


def plan_jobs(onnx_fp16: Path, onnx_int8: Path, repo: Path, *, gpu: Gpu | None = None,
              per_cc: bool = False, sparse_weights: bool | None = None,
              extra: dict[str, tuple[str, Path]] | None = None) -> list[Job]:
    """Read each model's Triton config, derive its profile and check its ONNX against it.
    ``extra``: more engines, model -> (precision, ONNX), built the same way."""
    jobs = []
    todo = [(m, prec, o) for (m, prec), o in zip(MODELS.items(), (onnx_fp16, onnx_int8))]
    todo += [(m, prec, o) for m, (prec, o) in (extra or {}).items()]
    for model, precision, onnx_path in todo:
        onnx_path = Path(onnx_path)
        if not onnx_path.exists():
            raise FileNotFoundError(f"{model}: {onnx_path} is missing (the {precision} ONNX stage makes it)")
        cfg = load_config(Path(repo) / model / "config.pbtxt")
        if cfg.name != model or cfg.platform != "tensorrt_plan":
            raise ValueError(f"{repo / model / 'config.pbtxt'}: expected name {model!r}, platform 'tensorrt_plan'")
        check_io(onnx_path, cfg)
        plan_name, manifest_name = file_names(gpu, per_cc)
        version_dir = Path(repo) / model / "1"
        jobs.append(Job(model, precision, onnx_path, cfg, profile_from_config(cfg), version_dir / plan_name,
                        version_dir / manifest_name, _sparse_choice(onnx_path, sparse_weights)))
    return jobs


def stage_inputs(job: Job, trt_version: str, gpu: Gpu) -> dict:
    """Everything the engine's bytes depend on; a change in any of them rebuilds it."""
    return {"onnx_sha256": sha256_file(job.onnx), "profile": [p.as_dict() for p in job.profile], "io": job.io(),
            "tensorrt": trt_version, "gpu": [gpu.name, gpu.compute_capability], "strongly_typed": True,
            "sparse_weights": job.sparse_weights, "plan": job.plan.name, "code": code_hash(*CODE)}


def _check_network(network, job: Job) -> None:
    """The parsed network must have the profile's inputs, each with a dynamic batch axis when batched."""
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(p.name for p in job.profile):
        raise ValueError(f"{job.model}: network inputs {names}, config inputs {[p.name for p in job.profile]}")
    if job.config.max_batch_size > 0:
        fixed = [network.get_input(i).name for i in range(network.num_inputs) if network.get_input(i).shape[0] != -1]
        if fixed:
            raise ValueError(f"{job.model}: inputs {fixed} have no dynamic batch axis in the network")


def engine_io(trt, engine) -> list[dict]:
    """Each I/O tensor of a built engine: name, mode, Triton data type, shape, and its profile 0 shapes."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "INPUT" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "OUTPUT"
        dtype = engine.get_tensor_dtype(name).name
        item = {"name": name, "mode": mode, "data_type": TRT_TO_TRITON.get(dtype, dtype),
                "shape": list(engine.get_tensor_shape(name))}
        if mode == "INPUT":
            item["profile0"] = [list(s) for s in engine.get_tensor_profile_shape(name, 0)]
        out.append(item)
    return out


def check_engine_io(io: list[dict], job: Job) -> None:
    """The engine must present exactly the config's tensors (after the batch axis) and profile."""
    batched = job.config.max_batch_size > 0
    have = {(t["name"], t["mode"], t["data_type"], tuple(t["shape"][1:] if batched else t["shape"])) for t in io}
    want = {(t["name"], t["mode"], t["data_type"], tuple(t["dims"])) for t in job.io()}
    if have != want:
        raise RuntimeError(f"{job.model}: engine I/O {sorted(have)} differs from the Triton config {sorted(want)}")
    profiles = {t["name"]: t["profile0"] for t in io if t["mode"] == "INPUT"}
    for p in job.profile:
        if profiles[p.name] != [list(p.min), list(p.opt), list(p.max)]:
            raise RuntimeError(f"{job.model}: engine profile {profiles[p.name]} for {p.name}, wanted {p.as_dict()}")


def _write_atomic(path: Path, data: bytes) -> None:
    """A server polling the repository never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _source_weights_sha256(onnx_path: Path) -> str | None:
    """Provenance from the ONNX stage's own manifest, when it wrote one next to the file."""
    try:
        return json.loads((onnx_path.parent / "manifest.json").read_text()).get("source_weights_sha256")
    except (OSError, ValueError):
        return None


def build_engine(trt, job: Job, gpu: Gpu, timing_cache: Path) -> dict:
    """Parse, build, check and install one engine with its manifest; returns the manifest."""
    logger = trt.Logger(trt.Logger.VERBOSE if os.environ.get("TRT_VERBOSE") == "1" else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.onnx)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{job.model}: TensorRT could not parse {job.onnx}:\n  {errors}")
    _check_network(network, job)

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer details for the inspector dump
    if job.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    for p in job.profile:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = progress.monitor(trt, job.model)
    if monitor is not None:
        config.progress_monitor = monitor

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise RuntimeError(f"{job.model}: TensorRT built no engine from {job.onnx} (TRT_VERBOSE=1 shows why)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    plan = bytes(memoryview(serialized))

    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError(f"{job.model}: the engine just built does not deserialize")
    io = engine_io(trt, engine)
    check_engine_io(io, job)
    layers = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)

    job.plan.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(job.plan, plan)
    manifest = {
        "artifact": job.plan.name, "variant": f"tensorrt_{job.precision}", "precision": job.precision,
        "model": job.model, "size_bytes": job.plan.stat().st_size, "sha256": sha256_file(job.plan),
        "source_onnx": str(job.onnx), "source_onnx_sha256": sha256_file(job.onnx),
        "source_weights_sha256": _source_weights_sha256(job.onnx),
        "tensorrt_version": trt.__version__,
        "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "profile": [p.as_dict() for p in job.profile],
        "builder": {"strongly_typed": True, "sparse_weights": job.sparse_weights, "profiling_verbosity": "DETAILED",
                    "timing_cache": str(timing_cache), "build_seconds": round(seconds, 1)},
        "io": io,
        "producer_command": " ".join(["python -m build_engines"] + sys.argv[1:]),
        "layers": json.loads(layers) if layers.strip().startswith("{") else layers,
    }
    _write_atomic(job.manifest, (json.dumps(manifest, indent=2) + "\n").encode())
    print(f"[tensorrt {job.model}] {job.plan} ({manifest['size_bytes'] / 1e6:.1f} MB) in {seconds:.0f} s "
          f"on {gpu.name} (cc {gpu.compute_capability}), TensorRT {trt.__version__}", flush=True)
    return manifest


def update_cc_index(version_dir: Path) -> None:
    """Per-architecture mode: manifest.json indexes every manifest_sm*.json, with one digest over the set,
    because the audit record reads <model>/1/manifest.json's sha256."""
    engines = {}
    for m in sorted(version_dir.glob("manifest_sm*.json")):
        data = json.loads(m.read_text())
        engines[data["gpu"]["compute_capability"]] = {k: data[k] for k in ("artifact", "sha256", "size_bytes",
                                                                            "tensorrt_version", "gpu")}
    index = {"artifact": "cc_model_filenames", "engines": engines,
             "sha256": sha256_json({cc: e["sha256"] for cc, e in engines.items()})}
    _write_atomic(version_dir / "manifest.json", (json.dumps(index, indent=2) + "\n").encode())


def build_all(onnx_fp16: Path, onnx_int8: Path, repo: Path, *, work: Path | None = None,
              per_cc: bool | None = None, sparse_weights: bool | None = None,
              extra: dict[str, tuple[str, Path]] | None = None) -> list:
    """Build (or keep, when up to date) both engines (and ``extra``'s); returns their manifests, [] where skipped."""
    trt, gpu, reason = availability()
    if reason:
        print(skip_line(reason), flush=True)
        return []
    per_cc = os.environ.get("TRT_ENGINES_PER_CC") == "1" if per_cc is None else per_cc
    work = Path(work) if work is not None else paths.BUILD / "tensorrt"
    timing_cache = work / f"timing_{gpu.sm}_trt{trt.__version__}.cache"
    manifests = []
    for job in plan_jobs(onnx_fp16, onnx_int8, repo, gpu=gpu, per_cc=per_cc, sparse_weights=sparse_weights,
                         extra=extra):
        stamp_dir = work / job.model / (gpu.sm if per_cc else "")
        run_stage(f"tensorrt {job.model}", stamp_dir, stage_inputs(job, trt.__version__, gpu),
                  [job.plan, job.manifest], lambda job=job: build_engine(trt, job, gpu, timing_cache))
        if per_cc:
            update_cc_index(job.plan.parent)
        manifests.append(json.loads(job.manifest.read_text()))
    return manifests


if __name__ == "__main__":
    build_all(paths.FP16_DIR / "model.onnx", paths.INT8_TRT_DIR / "model.onnx", paths.REPO)
