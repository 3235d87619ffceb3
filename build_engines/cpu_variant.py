"""The CPU variant: the fastest candidate derived from the pruned model that meets the budget.

Candidates: the pruned FP32 graph and the accuracy-aware mixed INT8 graph, both with ONNX
Runtime's optimizations saved offline; the fully INT8 graph is measured too, so the
report shows what the budget costs. Fidelity is against the original FP32 model on the
evaluation split; speed is measured side by side with the original.
"""
import json
import shutil
from pathlib import Path

import numpy as np

from . import cost, evaluate, quantize, throughput
from .ort_offline import optimize
from .sanity import check_sanity


def build(source: Path, pruned: Path, out_dir: Path, calib_x, search_x, search_ref, eval_x, eval_ref,
          budget: float, margin: float, method_choices=("minmax", "percentile")) -> dict:
    work = out_dir / "work"
    qlog = quantize.accuracy_aware(pruned, work, calib_x, search_x, search_ref, eval_x, eval_ref,
                                   budget, margin, quantize.CPU, methods=method_choices)
    full = work / "int8_full.onnx"
    quantize.quantize(work / "input_fp32.onnx", full, calib_x, qlog["method"], quantize.CPU, (), work)

    mixed = work / "int8_mixed.onnx"
    Path(qlog["model"]).replace(mixed)
    graphs = {"pruned-fp32-ortopt": Path(pruned), "pruned-int8-mixed-ortopt": mixed, "pruned-int8-full-ortopt": full}
    cands = {
        "pruned-fp32-ortopt": (optimize(pruned, out_dir / "pruned_fp32_ortopt.onnx"), "fp32"),
        "pruned-int8-mixed-ortopt": (optimize(mixed, out_dir / "pruned_int8_mixed_ortopt.onnx"),
                                     f"int8 mixed ({qlog['n_quantized']}/{qlog['n_layers']} layers INT8)"),
        "pruned-int8-full-ortopt": (optimize(full, out_dir / "pruned_int8_full_ortopt.onnx"), "int8"),
    }
    print("  [cpu] measuring candidates side by side with the original ...", flush=True)
    ips = throughput.measure({"original": source, **{k: v[0] for k, v in cands.items()}})
    table = {}
    for name, (path, precision) in cands.items():
        score = evaluate.score(path, eval_x, eval_ref)
        try:
            sanity, sane = check_sanity(path), True
        except AssertionError as e:
            sanity, sane = str(e), False
        table[name] = {"path": str(path), "graph": str(graphs[name]), "precision": precision,
                       **cost.summary(graphs[name]), "size_bytes": path.stat().st_size, **score, **ips[name],
                       "speedup_b8": ips[name]["b8"] / ips["original"]["b8"],
                       "speedup_b1": ips[name]["b1"] / ips["original"]["b1"],
                       "sanity": sanity, "meets_budget": bool(score["top1_agreement"] >= budget and sane)}
        print(f"  [cpu] {name:26s} top-1 {score['top1_agreement']:.3f}  b8 x{table[name]['speedup_b8']:.2f}"
              f"  {'within budget' if table[name]['meets_budget'] else 'REJECTED (budget)'}", flush=True)
    ok = [k for k, v in table.items() if v["meets_budget"]]
    if not ok:
        raise SystemExit("no CPU candidate meets the fidelity budget; lower --budget or check the pruning stage")
    chosen = max(ok, key=lambda k: table[k]["b8"])
    shutil.copyfile(table[chosen]["path"], out_dir / "model.onnx")
    log = {"chosen": chosen, "budget": budget, "candidates": table, "original_img_s": ips["original"],
           "quantization": qlog}
    (out_dir / "cpu_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
    print(f"  [cpu] chosen: {chosen}", flush=True)
    return log
