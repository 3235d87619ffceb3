"""Accuracy-aware static INT8 quantization (Q/DQ, per-channel weights) with ONNX Runtime.

A plain static quantization of EfficientNet-Lite0 loses too much fidelity, so:
1. choose the calibration method and the weight rounding (nearest, or GPTQ: see gptq.py)
   by measurement: full INT8 with each; best agreement on the search split wins;
2. measure each Conv/Gemm's sensitivity: quantize that layer alone and measure the
   softmax KL to the original on the search split (leave-one-out barely moved the KL:
   the error is spread over every layer, so excluding one at a time says little);
3. quantize the layers with the least KL per MAC (INT8 speed comes from the big layers)
   and keep the rest in FP32: the most layers for
   which the search split still meets budget + margin (bisection), confirmed on the
   evaluation split (fewer layers if it does not hold there).
Two flavours: the CPU one (uint8 asymmetric activations, so ORT can drop the ReLU6
clips and fuse QLinearConv) and TensorRT's (symmetric int8 activations, FP32 bias).
"""
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from . import cost, evaluate

METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
QUANTIZABLE = ("Conv", "Gemm")
logging.getLogger().setLevel(logging.ERROR)


@dataclass(frozen=True)
class Flavor:
    name: str
    activation_type: QuantType
    symmetric: bool
    quantize_bias: bool
    reduce_range: bool = False   # 7-bit weights: ORT's u8s8 kernels saturate on CPUs without VNNI (QAT's flavour)


CPU = Flavor("cpu", QuantType.QUInt8, symmetric=False, quantize_bias=True)
CPU_7BIT = Flavor("cpu7", QuantType.QUInt8, symmetric=False, quantize_bias=True, reduce_range=True)
TENSORRT = Flavor("tensorrt", QuantType.QInt8, symmetric=True, quantize_bias=False)


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int = 16):
        # equal batches: ORT's histogram collector stacks a chunk's batches and fails on a short last one
        batch = max(d for d in range(1, batch + 1) if len(x) % d == 0)
        self._batches = [x[i:i + batch] for i in range(0, len(x), batch)]
        self._it = iter(self._batches)

    def set_range(self, start_index: int, end_index: int):
        """ORT calibrates chunk by chunk (CalibStridedMinMax): histograms of 256 images at once took 12 GB."""
        self._it = iter(self._batches[start_index:end_index])

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {"input": b}

    def __len__(self):
        return len(self._batches)


def _with_rounding(fp32: Path, out: Path, rounding: dict, exclude) -> tuple:
    """Model with GPTQ grid weights on the layers to quantize (originals on excluded ones) + their scales."""
    m = onnx.load(str(fp32))
    keep = {n.input[1] for n in m.graph.node if n.name in set(exclude) and len(n.input) > 1}
    weights = {k: v for k, v in rounding["weights"].items() if k not in keep}
    for init in m.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    path = out.with_name(out.stem + "_grid_input.onnx")
    onnx.save(m, str(path))
    return path, {k: v for k, v in rounding["overrides"].items() if k in weights}


def quantize(fp32: Path, out: Path, calib_x: np.ndarray, method: str, flavor: Flavor,
             exclude=(), cache_dir: Path | None = None, rounding: dict | None = None) -> None:
    """One Q/DQ model. Calibration ranges are cached per (method, flavour) so scans do not recalibrate.

    `rounding` (from `gptq_rounding`) replaces round-to-nearest weights by GPTQ's.
    """
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"calib_{flavor.name}_{method}.json"
    overrides, src = {}, fp32
    if rounding is not None:
        src, overrides = _with_rounding(fp32, out, rounding, exclude)
    reader = _Reader(calib_x)
    stride = max(d for d in range(1, 5) if len(reader) % d == 0)   # <= 4 batches of 16 images per chunk
    quantize_static(
        str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=flavor.activation_type, weight_type=QuantType.QInt8, reduce_range=flavor.reduce_range,
        calibrate_method=METHODS[method], nodes_to_exclude=list(exclude),
        op_types_to_quantize=None, calibration_cache_path=str(cache) if cache else None,
        extra_options={"ActivationSymmetric": flavor.symmetric, "WeightSymmetric": True,
                       "CalibTensorRangeSymmetric": flavor.symmetric, "QuantizeBias": flavor.quantize_bias,
                       "TensorQuantOverrides": overrides, "QDQDisableWeightAdjustForInt32Bias": bool(overrides),
                       "CalibStridedMinMax": stride})
    if src != fp32:
        Path(src).unlink(missing_ok=True)


def gptq_rounding(fp32: Path, x: np.ndarray) -> dict:
    from . import gptq
    moments = gptq.input_moments(fp32, x)
    weights, overrides = gptq.round_model(fp32, moments)
    return {"weights": weights, "overrides": overrides}


def quantizable_nodes(fp32: Path) -> list[str]:
    return [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type in QUANTIZABLE]


def ends_nodes(fp32: Path) -> list[str]:
    """The stem conv and the classifier: the layers post-training INT8 hurts most (raw pixels in,
    logits out), and a small share of the MACs."""
    nodes = quantizable_nodes(fp32)
    return [nodes[0], nodes[-1]]


def accuracy_aware(fp32: Path, work: Path, calib_x: np.ndarray, search_x: np.ndarray, search_ref: np.ndarray,
                   eval_x: np.ndarray, eval_ref: np.ndarray, budget: float, margin: float, flavor: Flavor,
                   methods=("minmax", "percentile"), gptq_images: int = 128, scan_n: int = 64) -> dict:
    """-> (log: chosen method and rounding, INT8 layers, scans, final model path (work/<flavor>.onnx);
    the weight rounding used, for building more models the same way)."""
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("calib_*.json"):   # ranges cached by an earlier build belong to another model
        stale.unlink()
    private = work / "input_fp32.onnx"   # ORT writes `<input>-inferred.onnx` beside its input: keep that private
    private.write_bytes(Path(fp32).read_bytes())
    fp32 = private
    tmp = work / f"{flavor.name}_scan.onnx"
    log = {"flavor": flavor.name, "budget": budget, "margin": margin, "methods": {}}

    roundings = {"nearest": None}
    if gptq_images:
        t0 = time.perf_counter()
        roundings["gptq"] = gptq_rounding(fp32, calib_x[:gptq_images])
        print(f"  [{flavor.name}] GPTQ weight rounding ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    def trial(choice, exclude, n=None):
        """Score on the search split, or on its first n images (per-layer scans: KL is smooth enough)."""
        method, rnd = choice
        quantize(fp32, tmp, calib_x, method, flavor, exclude, work, roundings[rnd])
        return evaluate.score(tmp, search_x[:n], search_ref[:n])

    # 1. calibration method and weight rounding, by measurement (everything INT8)
    for m in methods:
        for rnd in roundings:
            t0 = time.perf_counter()
            r = log["methods"][f"{m}+{rnd}"] = trial((m, rnd), ())
            print(f"  [{flavor.name}] calibration {m:10s} rounding {rnd:7s}: search top-1 "
                  f"{r['quality']:.3f} KL {r['mean_kl']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    best = min(log["methods"], key=lambda k: (-log["methods"][k]["quality"], log["methods"][k]["mean_kl"]))
    method = tuple(best.split("+"))
    base = log["methods"][best]
    log["method"], log["rounding"] = method
    rounding = roundings[method[1]]
    log["choice"] = best

    # 2. sensitivity of each layer alone: quantize only that layer, measure the KL it causes
    nodes = quantizable_nodes(fp32)
    all_nodes = [n.name for n in onnx.load(str(fp32)).graph.node]
    sens = {}
    t0 = time.perf_counter()
    for i, n in enumerate(nodes):
        sens[n] = trial(method, [m for m in all_nodes if m != n], scan_n)
        if (i + 1) % 10 == 0 or i + 1 == len(nodes):
            print(f"  [{flavor.name}] sensitivity {i + 1}/{len(nodes)} layers "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    # least harm per unit of work first: INT8 pays off on the layers that do the most MACs
    layer_macs = cost.node_macs(onnx.load(str(fp32)))
    ranked = sorted(nodes, key=lambda n: sens[n]["mean_kl"] / max(layer_macs.get(n, 1), 1))
    log["sensitivity"] = [{"node": n, "macs": layer_macs.get(n, 0), **sens[n]} for n in ranked]

    # 3. quantize the k least sensitive layers, keep the rest (and everything between) in FP32;
    #    bisect on k: the largest k whose search-split agreement meets budget + margin,
    #    then confirm on the evaluation split and step down if it does not hold there.
    def config(k):
        quantized = set(ranked[:k])
        return [m for m in all_nodes if m not in quantized] if k < len(nodes) else []

    curve = {}

    def search(k):
        if k not in curve:
            curve[k] = base if k == len(nodes) else trial(method, config(k))
            print(f"  [{flavor.name}] {k:2d}/{len(nodes)} layers INT8: search top-1 "
                  f"{curve[k]['quality']:.3f} KL {curve[k]['mean_kl']:.4f}", flush=True)
        return curve[k]["quality"] >= budget + margin

    lo, hi = 0, len(nodes)          # invariant: k=lo passes (no layer quantized = the FP32 model)
    if search(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if search(mid):
            lo = mid
        else:
            hi = mid
    chosen = None
    while lo > 0:
        quantize(fp32, tmp, calib_x, method[0], flavor, config(lo), work, rounding)
        ev = evaluate.score(tmp, eval_x, eval_ref)
        print(f"  [{flavor.name}] {lo} layers INT8: eval split quality {ev['quality']:.3f}", flush=True)
        if ev["quality"] >= budget:
            chosen = lo
            break
        lo = lo * 3 // 4
    curve = [{"quantized_layers": k, **v} for k, v in sorted(curve.items())]
    log["curve"] = curve
    final = work / f"{flavor.name}.onnx"
    k = chosen or 0
    quantize(fp32, final, calib_x, method[0], flavor, config(k), work, rounding)
    tmp.unlink(missing_ok=True)
    log.update({"quantized_layers": ranked[:k], "n_quantized": k, "n_layers": len(nodes),
                "meets_budget": chosen is not None, "model": str(final)})
    # the classic remedy, for the report and the guard tests: everything INT8 but the first and last layers
    ends = ends_nodes(fp32)
    ends_model = work / f"{flavor.name}_ends_fp32.onnx"
    quantize(fp32, ends_model, calib_x, method[0], flavor, ends, work, rounding)
    log["ends_fp32"] = {"fp32_layers": ends, "model": str(ends_model),
                        "search": evaluate.score(ends_model, search_x, search_ref)}
    return log, rounding
