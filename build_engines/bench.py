"""`make bench-engines`: original FP32 vs pruned FP32 vs the installed CPU variant, side by side in one run.

Re-measures everything (accuracy when the build's images are labeled, fidelity on the evaluation
split, size, GFLOPs, img/s at batch 1 and 8) rather than quoting the build's figures, then checks
the targets: CPU variant >= 2x the original's batch-8 throughput within the budget (the build's:
at most 1 point of top-1 accuracy lost with labels, >= 97 % agreement without), and the pruned
model >= 25 % fewer FLOPs within the same budget. Writes build/engines/bench/.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import evaluate, images, paths, report
from .install import MODEL as INSTALLED_MODEL


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m build_engines.bench", description=__doc__)
    ap.add_argument("--budget", type=float, help="quality floor (default: the build's, from the manifest)")
    args = ap.parse_args(argv)
    src, pruned = paths.SOURCE_DIR / "model.onnx", paths.PRUNED_DIR / "model.onnx"
    for p in (src, pruned, INSTALLED_MODEL, paths.IMAGES_DIR / "eval.npy"):
        if not p.exists():
            print(f"missing {p}: run `make engines` first", file=sys.stderr)
            return 2
    manifest = json.loads((paths.CPU_MODEL_DIR / "manifest.json").read_text())
    args.budget = args.budget or manifest["figures"]["budget"]
    x = images.to_batch(np.load(paths.IMAGES_DIR / "eval.npy"))
    y = np.load(paths.IMAGES_DIR / "eval_labels.npy")
    ref = evaluate.Reference(evaluate.run(src, x), y if len(y) else None)
    print(f"[bench] {len(x)} evaluation images; CPU variant installed: {manifest['variant']} "
          f"({manifest['precision']})", flush=True)
    cpu_log = json.loads((paths.CPU_DIR / "cpu_log.json").read_text())
    graph = cpu_log["candidates"][cpu_log["chosen"]]["graph"]
    rows = report.measure({"original-fp32": src, "pruned-fp32": pruned, "cpu-variant": INSTALLED_MODEL}, x, ref,
                          notes={"cpu-variant": manifest["variant"]}, graphs={"cpu-variant": Path(graph)})
    orig, prun, cpu = rows
    targets = {
        "cpu_variant_2x_b8": {"target": f">= 2.00x batch-8 img/s and quality >= {args.budget} "
                                        f"({cpu['quality_basis']})",
                              "measured": f"{cpu['speedup_b8']:.2f}x, quality {cpu['quality']:.3f}",
                              "met": bool(cpu["speedup_b8"] >= 2.0 and cpu["quality"] >= args.budget)},
        "pruned_25pct_fewer_flops": {"target": ">= 25% fewer FLOPs within budget",
                                     "measured": f"{1 - prun['macs'] / orig['macs']:.1%} fewer, "
                                                 f"quality {prun['quality']:.3f}",
                                     "met": bool(1 - prun["macs"] / orig["macs"] >= 0.25
                                                 and prun["quality"] >= args.budget)},
    }
    out = paths.BUILD / "bench"
    report.write(rows, out, "bench", "make bench-engines: original vs pruned vs CPU variant", args.budget,
                 extra={"targets": targets})
    print()
    print(report.table(rows))
    for name, t in targets.items():
        print(f"[bench] {name}: target {t['target']}; measured {t['measured']} -> {'MET' if t['met'] else 'NOT MET'}")
    print(f"[bench] written {out / 'bench.md'}, bench.json, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
