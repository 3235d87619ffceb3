"""The TensorRT engine stage: its gate, the profiles it derives from the Triton configs, and its
checks of the ONNX files; the real builds run where TensorRT and a GPU exist."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from build_engines.tensorrt import engines as te, gpu as trt_gpu, progress as trt_progress
from build_engines.tensorrt.onnx_checks import has_2to4_sparse_weights, is_2to4_sparse
from build_engines.tensorrt.opt_profile import TensorProfile, load_config, profile_from_config
from build_engines.uint8_front import add_front

REPO = Path(__file__).resolve().parent.parent / "model_repository"
TRT_MODELS = ("classifier_trt_fp16", "classifier_trt_int8")
trt_ready = te.availability()[2] is None
needs_trt = pytest.mark.skipif(not trt_ready, reason=f"needs TensorRT and a GPU ({te.availability()[2]})")


def tiny_classifier(path: Path, *, kind: str = "fp16", batch="N", io_type=TensorProto.FLOAT,
                    input_name: str = "input", sparse: bool = False) -> Path:
    """A small real classifier with the contract's I/O: Conv 3->8 (1x1), global pool, Gemm 8->1000,
    behind the build's UINT8 front (UINT8 NHWC in) when its input is the contract's FP32 `input`.

    kind 'fp16': FP16 weights with Casts at the edges; kind 'qdq': INT8 Q/DQ on the input and Conv weight."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 1, 1)).astype(np.float32)
    if sparse:   # 8 input channels, two zeros in every group of four
        w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
        w[:, 1::4] = 0
        w[:, 2::4] = 0
    cin = w.shape[1]
    fc = rng.standard_normal((1000, 8)).astype(np.float32) * 0.1
    nodes, inits = [], []
    x = input_name
    if cin != 3:   # widen the 3-channel input so a sparse 8-channel weight can follow
        inits.append(numpy_helper.from_array(rng.standard_normal((cin, 3, 1, 1)).astype(np.float32), "widen_w"))
        nodes.append(helper.make_node("Conv", [x, "widen_w"], ["wide"]))
        x = "wide"
    if kind == "fp16":
        if io_type == TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [x], ["x16"], to=TensorProto.FLOAT16))
            x = "x16"
        inits += [numpy_helper.from_array(w.astype(np.float16), "conv_w"),
                  numpy_helper.from_array(fc.astype(np.float16), "fc_w")]
        nodes += [helper.make_node("Conv", [x, "conv_w"], ["c"]),
                  helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                  helper.make_node("Flatten", ["p"], ["f"]),
                  helper.make_node("Gemm", ["f", "fc_w"], ["l16" if io_type == TensorProto.FLOAT else "logits"],
                                   transB=1)]
        if io_type == TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", ["l16"], ["logits"], to=TensorProto.FLOAT))
    else:
        scale = np.float32(np.abs(w).max() / 127)
        inits += [numpy_helper.from_array(np.array(1 / 64, np.float32), "x_scale"),
                  numpy_helper.from_array(np.array(0, np.int8), "zp"),
                  numpy_helper.from_array(np.clip(np.round(w / scale), -127, 127).astype(np.int8), "conv_wq"),
                  numpy_helper.from_array(np.array(scale, np.float32), "w_scale"),
                  numpy_helper.from_array(fc, "fc_w")]
        nodes += [helper.make_node("QuantizeLinear", [x, "x_scale", "zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "zp"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["conv_wq", "w_scale", "zp"], ["conv_w"]),
                  helper.make_node("Conv", ["xd", "conv_w"], ["c"]),
                  helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                  helper.make_node("Flatten", ["p"], ["f"]),
                  helper.make_node("Gemm", ["f", "fc_w"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, io_type, [batch, 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", io_type, [batch, 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if input_name == "input" and io_type == TensorProto.FLOAT:
        model = add_front(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_pair(tmp_path):
    return (tiny_classifier(tmp_path / "fp16.onnx", kind="fp16"),
            tiny_classifier(tmp_path / "int8.onnx", kind="qdq"))


@pytest.fixture
def repo(tmp_path):
    """A repository with the real TensorRT model configs and empty version directories."""
    out = tmp_path / "repo"
    for m in TRT_MODELS:
        (out / m / "1").mkdir(parents=True)
        shutil.copyfile(REPO / m / "config.pbtxt", out / m / "config.pbtxt")
    return out


def plans(root: Path) -> list[Path]:
    return sorted(root.rglob("*.plan"))


# --- the gate -------------------------------------------------------------------------------

def test_skipped_with_one_clear_line_without_tensorrt(monkeypatch, capsys, onnx_pair, repo, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # `import tensorrt` raises ImportError
    assert te.build_all(*onnx_pair, repo, work=tmp_path / "work") == []
    out = capsys.readouterr().out
    assert out.splitlines() == ["TensorRT engines: skipped (TensorRT not installed; "
                                "build on a GPU host inside the Triton container)"]
    assert plans(tmp_path) == [] and plans(REPO) == []
    assert not (tmp_path / "work").exists()


def test_this_host_skips(capsys, onnx_pair, repo, tmp_path):
    """On a CPU host (or without TensorRT) the real call skips; on a GPU host it must build instead."""
    if trt_ready:
        pytest.skip("TensorRT and a GPU are present: test_builds_real_engines covers this host")
    assert te.build_all(*onnx_pair, repo, work=tmp_path / "work") == []
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith("TensorRT engines: skipped (") and line.endswith(te.SKIP_HINT + ")")
    assert plans(tmp_path) == []


def _stub_tensorrt(strongly_typed: bool) -> types.ModuleType:
    """Just enough of a `tensorrt` module for the gate to get past the import (never builds)."""
    mod = types.ModuleType("tensorrt")
    mod.__version__ = "10.99.0"
    mod.NetworkDefinitionCreationFlag = types.SimpleNamespace(**({"STRONGLY_TYPED": 1} if strongly_typed else {}))
    return mod


def test_skipped_without_gpu(monkeypatch, capsys, onnx_pair, repo, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", _stub_tensorrt(True))
    monkeypatch.setattr(trt_gpu, "probe", lambda ordinal=0: None)
    assert te.build_all(*onnx_pair, repo, work=tmp_path / "work") == []
    assert capsys.readouterr().out.splitlines() == [te.skip_line("no CUDA GPU found")]
    assert plans(tmp_path) == []


def test_skipped_on_tensorrt_without_strong_typing(monkeypatch, capsys, onnx_pair, repo, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", _stub_tensorrt(False))
    assert te.build_all(*onnx_pair, repo, work=tmp_path / "work") == []
    line, = capsys.readouterr().out.splitlines()
    assert "TensorRT 10.99.0 cannot build strongly typed networks" in line
    assert plans(tmp_path) == []


def test_gpu_probe_agrees_with_the_driver():
    """No device node: no GPU. A device node: the probe must find it (a probe that returns None on a GPU
    host would skip every engine build there) and read a plausible compute capability."""
    gpu = trt_gpu.probe()
    if not Path("/dev/nvidia0").exists():
        assert gpu is None
        return
    assert gpu is not None, "/dev/nvidia0 exists, but the CUDA driver probe found no GPU"
    major, minor = gpu.compute_capability.split(".")
    assert int(major) >= 3 and minor.isdigit() and gpu.sm == f"sm{major}{minor}" and gpu.name


# --- profiles from the Triton configs ---------------------------------------------------------

@pytest.mark.parametrize("model", TRT_MODELS)
def test_profile_shapes_from_config(model):
    assert profile_from_config(load_config(REPO / model / "config.pbtxt")) == [
        TensorProfile("input", "TYPE_UINT8", (1, 224, 224, 3), (8, 224, 224, 3), (16, 224, 224, 3))]


def _config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_profile_follows_the_config():
    inp = 'input [ { name: "x" data_type: TYPE_FP16 dims: [ 4, 5 ] } ]'
    got = profile_from_config(_config(f'name: "m" max_batch_size: 32 {inp} '
                                      'dynamic_batching { preferred_batch_size: [ 16, 2 ] }'))
    assert got == [TensorProfile("x", "TYPE_FP16", (1, 4, 5), (16, 4, 5), (32, 4, 5))]
    no_preferred = profile_from_config(_config(f'name: "m" max_batch_size: 4 {inp} dynamic_batching {{ }}'))
    assert (no_preferred[0].opt, no_preferred[0].max) == ((4, 4, 5), (4, 4, 5))
    unbatched = profile_from_config(_config(f'name: "m" max_batch_size: 0 {inp}'))
    assert unbatched[0].min == unbatched[0].opt == unbatched[0].max == (4, 5)
    with pytest.raises(ValueError, match="preferred_batch_size"):
        profile_from_config(_config(f'name: "m" max_batch_size: 4 {inp} '
                                    'dynamic_batching { preferred_batch_size: 8 }'))
    with pytest.raises(ValueError, match="fixed dims"):
        profile_from_config(_config('name: "m" max_batch_size: 4 '
                                    'input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]'))


# --- everything decided before TensorRT ---------------------------------------------------------

def test_jobs_from_configs_and_onnx(onnx_pair, repo):
    jobs = te.plan_jobs(*onnx_pair, repo)
    assert [(j.model, j.precision, j.onnx) for j in jobs] == [
        ("classifier_trt_fp16", "fp16", onnx_pair[0]), ("classifier_trt_int8", "int8", onnx_pair[1])]
    for j in jobs:
        assert j.plan == repo / j.model / "1" / "model.plan"
        assert j.manifest == repo / j.model / "1" / "manifest.json"   # what the audit's model digest reads
        assert [(p.min[0], p.opt[0], p.max[0]) for p in j.profile] == [(1, 8, 16)]
        assert j.sparse_weights is False   # random dense weights
        assert j.io() == [{"name": "input", "mode": "INPUT", "data_type": "TYPE_UINT8", "dims": [224, 224, 3]},
                          {"name": "logits", "mode": "OUTPUT", "data_type": "TYPE_FP32", "dims": [1000]}]
    assert plans(repo) == []


def test_fp16_io_is_rejected_before_any_build(tmp_path, repo, onnx_pair):
    bad = tiny_classifier(tmp_path / "fp16_io.onnx", kind="fp16", io_type=TensorProto.FLOAT16)
    with pytest.raises(ValueError, match=r"'input' is FLOAT16 in the ONNX but TYPE_UINT8.*strongly typed"):
        te.plan_jobs(bad, onnx_pair[1], repo)


def test_fixed_batch_is_rejected(tmp_path, repo, onnx_pair):
    bad = tiny_classifier(tmp_path / "b1.onnx", kind="qdq", batch=1)
    with pytest.raises(ValueError, match="fixed batch dimension 1"):
        te.plan_jobs(onnx_pair[0], bad, repo)


def test_wrong_input_name_is_rejected(tmp_path, repo, onnx_pair):
    bad = tiny_classifier(tmp_path / "named.onnx", kind="qdq", input_name="images")
    with pytest.raises(ValueError, match=r"inputs are \['images'\] in the ONNX, \['input'\]"):
        te.plan_jobs(onnx_pair[0], bad, repo)


def test_missing_onnx_is_an_error(tmp_path, repo, onnx_pair):
    with pytest.raises(FileNotFoundError, match="classifier_trt_int8"):
        te.plan_jobs(onnx_pair[0], tmp_path / "nope.onnx", repo)


def test_sparse_weights_detected(tmp_path):
    w = np.ones((4, 8, 3, 3), np.float32)
    assert not is_2to4_sparse(w)
    w[:, 0::4] = 0
    w[:, 3::4] = 0
    assert is_2to4_sparse(w)
    w[0, 0, 0, 0] = 1
    assert not is_2to4_sparse(w)
    assert not is_2to4_sparse(np.zeros((4, 1, 3, 3)))   # depthwise: no groups of 4 channels
    assert has_2to4_sparse_weights(tiny_classifier(tmp_path / "s16.onnx", kind="fp16", sparse=True))
    assert has_2to4_sparse_weights(tiny_classifier(tmp_path / "sq.onnx", kind="qdq", sparse=True))
    assert not has_2to4_sparse_weights(tiny_classifier(tmp_path / "d.onnx", kind="qdq"))


def test_sparse_weights_choice(tmp_path, repo, onnx_pair, monkeypatch):
    sparse = tiny_classifier(tmp_path / "sparse.onnx", kind="fp16", sparse=True)
    assert [j.sparse_weights for j in te.plan_jobs(sparse, onnx_pair[1], repo)] == [True, False]
    monkeypatch.setenv("TRT_SPARSE_WEIGHTS", "0")
    assert [j.sparse_weights for j in te.plan_jobs(sparse, onnx_pair[1], repo)] == [False, False]
    monkeypatch.setenv("TRT_SPARSE_WEIGHTS", "1")
    assert [j.sparse_weights for j in te.plan_jobs(sparse, onnx_pair[1], repo)] == [True, True]


def test_rebuild_key_tracks_inputs(tmp_path, repo, onnx_pair):
    gpu = trt_gpu.Gpu("NVIDIA A10", "8.6")
    job = te.plan_jobs(*onnx_pair, repo)[0]
    key = te.stage_inputs(job, "10.3.0", gpu)
    assert te.stage_inputs(job, "10.3.0", gpu) == key
    assert te.stage_inputs(job, "10.4.0", gpu) != key
    assert te.stage_inputs(job, "10.3.0", trt_gpu.Gpu("NVIDIA H100", "9.0")) != key
    tiny_classifier(onnx_pair[0], kind="fp16", sparse=True)   # new ONNX bytes, same path
    assert te.stage_inputs(job, "10.3.0", gpu) != key


def test_per_architecture_names(tmp_path, repo, onnx_pair):
    gpu = trt_gpu.Gpu("NVIDIA L4", "8.9")
    assert te.file_names(gpu, per_cc=False) == ("model.plan", "manifest.json")
    assert te.file_names(gpu, per_cc=True) == ("model_sm89.plan", "manifest_sm89.json")
    job = te.plan_jobs(*onnx_pair, repo, gpu=gpu, per_cc=True)[1]
    assert job.plan.name == "model_sm89.plan"


def test_cc_index_digest_covers_every_engine(tmp_path):
    def manifest(cc, sha):
        (tmp_path / f"manifest_sm{cc.replace('.', '')}.json").write_text(json.dumps(
            {"artifact": f"model_sm{cc.replace('.', '')}.plan", "sha256": sha, "size_bytes": 1,
             "tensorrt_version": "10.3.0", "gpu": {"name": "g", "compute_capability": cc}}))
    manifest("8.6", "a" * 64)
    manifest("9.0", "b" * 64)
    te.update_cc_index(tmp_path)
    index = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(index["engines"]) == ["8.6", "9.0"]
    manifest("9.0", "c" * 64)
    te.update_cc_index(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["sha256"] != index["sha256"]


def test_engine_io_check(repo, onnx_pair):
    job = te.plan_jobs(*onnx_pair, repo)[0]
    good = [{"name": "input", "mode": "INPUT", "data_type": "TYPE_UINT8", "shape": [-1, 224, 224, 3],
             "profile0": [[1, 224, 224, 3], [8, 224, 224, 3], [16, 224, 224, 3]]},
            {"name": "logits", "mode": "OUTPUT", "data_type": "TYPE_FP32", "shape": [-1, 1000]}]
    te.check_engine_io(good, job)
    half = [dict(good[0]), dict(good[1], data_type="TYPE_FP16")]
    with pytest.raises(RuntimeError, match="differs from the Triton config"):
        te.check_engine_io(half, job)
    other_profile = [dict(good[0], profile0=[[1, 224, 224, 3]] * 3), good[1]]
    with pytest.raises(RuntimeError, match="engine profile"):
        te.check_engine_io(other_profile, job)


def test_no_progress_monitor_on_old_tensorrt():
    assert trt_progress.monitor(types.SimpleNamespace(), "m") is None


# --- real builds (GPU hosts with TensorRT) ----------------------------------------------------

@needs_trt
def test_builds_real_engines(capsys, onnx_pair, repo, tmp_path):
    import tensorrt as trt
    manifests = te.build_all(*onnx_pair, repo, work=tmp_path / "work")
    assert [m["model"] for m in manifests] == list(TRT_MODELS)
    gpu = trt_gpu.probe()
    for m in manifests:
        plan = repo / m["model"] / "1" / "model.plan"
        assert m["sha256"] == te.sha256_file(plan) and m["size_bytes"] == plan.stat().st_size > 0
        assert m["tensorrt_version"] == trt.__version__
        assert m["gpu"] == {"name": gpu.name, "compute_capability": gpu.compute_capability}
        assert m["builder"]["strongly_typed"] is True
        assert m["profile"][0]["opt"] == [8, 224, 224, 3]
        assert isinstance(m["layers"], dict) and m["layers"].get("Layers")
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        assert engine is not None and engine.num_io_tensors == 2
    assert list((tmp_path / "work").glob("timing_*.cache"))
    capsys.readouterr()
    before = [te.sha256_file(p) for p in plans(repo)]
    te.build_all(*onnx_pair, repo, work=tmp_path / "work")
    assert capsys.readouterr().out.count("up to date") == 2
    assert [te.sha256_file(p) for p in plans(repo)] == before


def test_the_cascade_big_model_engine_is_planned_from_its_own_config(onnx_pair, repo, tmp_path):
    """The cascade's Lite2 FP16 engine is one more job of the same stage, its profile from its config
    (260 px input), and its ONNX is checked against that config like the others."""
    cfg = load_config(REPO / "classifier_big_trt_fp16" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and list(cfg.input[0].dims) == [260, 260, 3]
    big = REPO.parent / "build" / "engines" / "big" / "fp16.onnx"
    if not big.exists():
        pytest.fail("stage big has not run: `make engines`")
    shutil.copytree(REPO / "classifier_big_trt_fp16", repo / "classifier_big_trt_fp16", dirs_exist_ok=True)
    jobs = te.plan_jobs(*onnx_pair, repo, extra={"classifier_big_trt_fp16": ("fp16", big)})
    job = jobs[-1]
    assert (job.model, job.precision, job.onnx) == ("classifier_big_trt_fp16", "fp16", big)
    assert job.io()[0] == {"name": "input", "mode": "INPUT", "data_type": "TYPE_UINT8", "dims": [260, 260, 3]}
    assert [(p.min[0], p.opt[0], p.max[0]) for p in job.profile] == [(1, 8, 16)]
    with pytest.raises(ValueError, match="classifier_trt_fp16"):  # a 260 px graph does not fit the 224 px model
        te.plan_jobs(*onnx_pair, repo, extra={"classifier_trt_fp16": ("fp16", big)})
