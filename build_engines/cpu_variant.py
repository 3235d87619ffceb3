"""The CPU variant: the fastest candidate that meets the budget.

Candidates: the pruned FP32 graph, and accuracy-aware mixed INT8 graphs from the pruned
(and, with `--int8-from-unpruned`, the unpruned) model, all with ONNX Runtime's optimizations saved offline; the
fully INT8 graphs are measured too, so the report shows what the budget costs. Fidelity
is against the original FP32 model on the evaluation split; speed is measured side by
side with the original, in one run.
"""
import json
import shutil
from pathlib import Path

import numpy as np

from . import cost, evaluate, quantize, throughput
from .ort_offline import optimize
from .sanity import check_sanity

NOISE = 0.05   # relative throughput difference treated as a tie


def build(source: Path, pruned: Path, out_dir: Path, calib_x, search_x, search_ref, eval_x, eval_ref,
          budget: float, margin: float, method_choices=("minmax", "percentile"), scan_n: int = 64,
          int8_bases=("pruned",)) -> dict:
    work = out_dir / "work"
    qlogs, cands, graphs = {}, {}, {"pruned-fp32-ortopt": Path(pruned)}
    cands["pruned-fp32-ortopt"] = (optimize(pruned, out_dir / "pruned_fp32_ortopt.onnx"), "fp32")
    # INT8 from the pruned model and, on request, from the unpruned one: pruning spends part of
    # the budget that INT8 (the larger speed-up on CPU) then cannot use; the measurement decides.
    bases = {"pruned": Path(pruned), "unpruned": Path(source)}
    for base_name, base in ((b, bases[b]) for b in int8_bases):
        methods = method_choices if not qlogs else (qlogs["pruned"]["method"],)
        print(f"  [cpu] accuracy-aware INT8 from the {base_name} model", flush=True)
        qlog, rounding = quantize.accuracy_aware(base, work / base_name, calib_x, search_x, search_ref, eval_x,
                                                 eval_ref, budget, margin, quantize.CPU, methods=methods,
                                                 scan_n=scan_n)
        qlogs[base_name] = qlog
        mixed, full = work / base_name / "int8_mixed.onnx", work / base_name / "int8_full.onnx"
        Path(qlog["model"]).replace(mixed)
        quantize.quantize(work / base_name / "input_fp32.onnx", full, calib_x, qlog["method"], quantize.CPU, (),
                          work / base_name, rounding)
        for kind, path, precision in (
                ("mixed", mixed, f"int8 mixed ({qlog['n_quantized']}/{qlog['n_layers']} layers INT8, "
                                 f"{qlog['rounding']} rounding)"),
                ("full", full, f"int8 ({qlog['rounding']} rounding)")):
            name = f"{base_name}-int8-{kind}-ortopt"
            graphs[name] = path
            cands[name] = (optimize(path, out_dir / f"{base_name}_int8_{kind}_ortopt.onnx"), precision)

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
        print(f"  [cpu] {name:28s} top-1 {score['top1_agreement']:.3f}  b8 x{table[name]['speedup_b8']:.2f}"
              f"  {'within budget' if table[name]['meets_budget'] else 'REJECTED (budget)'}", flush=True)
    ok = [k for k, v in table.items() if v["meets_budget"]]
    if not ok:
        raise SystemExit("no CPU candidate meets the fidelity budget; lower --budget or check the pruning stage")
    # Fastest within budget; candidates within NOISE of the fastest count as equally fast (the
    # machines are shared), and among those the more faithful one wins.
    fastest = max(table[k]["b8"] for k in ok)
    tied = [k for k in ok if table[k]["b8"] >= (1 - NOISE) * fastest]
    chosen = max(tied, key=lambda k: (table[k]["top1_agreement"], -table[k]["mean_kl"]))
    shutil.copyfile(table[chosen]["path"], out_dir / "model.onnx")
    base_name = "unpruned" if chosen.startswith("unpruned") else "pruned"
    base_name = base_name if base_name in qlogs else next(iter(qlogs))
    log = {"chosen": chosen, "rule": f"fastest batch-8 within budget; within {NOISE:.0%} of it, most faithful",
           "budget": budget, "candidates": table, "original_img_s": ips["original"],
           "quantization": qlogs[base_name], "quantization_all": qlogs}
    (out_dir / "cpu_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
    print(f"  [cpu] chosen: {chosen}", flush=True)
    return log
