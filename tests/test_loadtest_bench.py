"""make bench's ratios: the decoding ceiling is all cores over ort_decode's CPU per image, set against
bare ORT's best arm, and it appears beside the saturation target it bounds."""
from __future__ import annotations

import os

from loadtest import bench


def _level(c: int, throughput: float, cores: float, p99: float = 50.0) -> dict:
    return {"concurrency": c, "throughput": throughput, "p99_ms": p99,
            "cpu": {"client": cores, "triton": 0.0, "gateway": 0.0, "fastapi": 0.0, "other": 0.0}}


def test_decode_ceiling_bounds_the_saturation_target():
    results = {"ort_decode": [_level(1, 50.0, 1.0), _level(8, 100.0, 2.0)],   # 20 ms CPU per image
               "ort_batched": [_level(8, 200.0, 2.0)],
               "pipeline_grpc": [_level(8, 80.0, 2.0)]}
    rat = bench.ratios(results, {})
    cores = os.cpu_count() or 1
    assert rat["cpu_ms_per_image_at_saturation"]["ort_decode"] == 20.0
    assert rat["decode_ceiling"] == {"throughput": round(cores * 50.0, 1), "best_ort_arm": "ort_batched",
                                     "ratio": round(cores * 50.0 / 200.0, 3)}
    row = next(r for r in bench.targets(rat, {}) if r[0].startswith("saturated pipeline_grpc"))
    assert f"at most {cores * 50.0:.0f} img/s" in row[1] and row[2] == "not met"
