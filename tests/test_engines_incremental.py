"""Incremental builds: a second `make engines` rebuilds nothing; a changed input rebuilds its stage."""
import json
import subprocess
import sys

from build_engines import paths
from build_engines.stages import run_stage

STAGES = ("source", "images", "prune", "cpu", "fp16", "int8_trt", "report", "install", "big")
DISTILL = ("distill_pool", "distill")   # only when the build was asked to distill (off by default)
QAT = ("qat_pool", "qat")               # unless the build was asked not to (--qat-steps 0)


def test_second_build_rebuilds_nothing():
    before = {p: p.stat().st_mtime_ns for p in paths.BUILD.rglob("*.onnx")}
    before[paths.CPU_MODEL_DIR / "model.onnx"] = (paths.CPU_MODEL_DIR / "model.onnx").stat().st_mtime_ns
    # the same options `make engines` used (a labeled folder when there is one)
    argv = json.loads((paths.CPU_DIR / "manifest.json").read_text())["producer_command"].split()[3:]
    r = subprocess.run([sys.executable, "-m", "build_engines", *argv], cwd=paths.ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for stage in STAGES:
        assert f"[{stage}] up to date" in r.stdout, r.stdout
    if "[distill] off" not in r.stdout:
        for stage in DISTILL:
            assert f"[{stage}] up to date" in r.stdout, r.stdout
    if "[qat] off" not in r.stdout:
        for stage in QAT:
            assert f"[{stage}] up to date" in r.stdout, r.stdout
    assert "building" not in r.stdout, r.stdout
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before


def test_stage_rebuilds_when_an_input_or_output_changes(tmp_path):
    out = tmp_path / "a.txt"
    calls = []

    def build():
        calls.append(1)
        out.write_text("x")

    assert run_stage("t", tmp_path, {"k": 1}, [out], build)
    assert not run_stage("t", tmp_path, {"k": 1}, [out], build)
    assert run_stage("t", tmp_path, {"k": 2}, [out], build)       # an input changed
    out.write_text("tampered")
    assert run_stage("t", tmp_path, {"k": 2}, [out], build)       # the output no longer matches its stamp
    assert len(calls) == 3
    assert json.loads((tmp_path / ".stamp.json").read_text())["inputs"] == {"k": 2}
