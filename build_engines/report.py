"""Fidelity report: every candidate next to the original, measured in one run.

Per candidate: top-1/top-5 accuracy with 95 % intervals when the images are labeled, and
top-1 agreement, top-5 overlap and mean KL against the original FP32 model on the evaluation split;
parameters, GFLOPs, file size; CPU img/s at batch 1 and 8 (ONNX Runtime, same threads, measured side by side).
Written as JSON, a Markdown table and PNG charts, and printed on the console.
"""
import json
from pathlib import Path

import numpy as np

from . import cost, evaluate, throughput


def measure(candidates: dict, eval_x: np.ndarray, eval_ref: np.ndarray, notes: dict | None = None,
            speed: bool = True, graphs: dict | None = None) -> list[dict]:
    """candidates: name -> ONNX path, the original first. Returns one row per candidate.

    `graphs` (name -> path) gives the standard-ONNX graph a candidate was optimized from:
    ORT's saved graphs use contrib ops (FusedConv, QLinearConv) that ONNX shape inference
    cannot size, so parameters and FLOPs are counted on the graph before optimization.
    """
    notes, graphs = notes or {}, graphs or {}
    rows = []
    for name, path in candidates.items():
        print(f"  [report] fidelity of {name} on {len(eval_x)} images ...", flush=True)
        c = cost.summary(graphs.get(name, path))
        c["size_bytes"] = path.stat().st_size if hasattr(path, "stat") else c["size_bytes"]
        rows.append({"name": name, "path": str(path), "note": notes.get(name, ""), **c,
                     **evaluate.score(path, eval_x, eval_ref)})
    if speed:
        ips = throughput.measure(candidates)
        for r in rows:
            r["img_s_b1"], r["img_s_b8"] = ips[r["name"]]["b1"], ips[r["name"]]["b8"]
        base = rows[0]
        for r in rows:
            r["speedup_b8"] = r["img_s_b8"] / base["img_s_b8"]
            r["speedup_b1"] = r["img_s_b1"] / base["img_s_b1"]
    return rows


def quality_label(rows_or_basis) -> str:
    basis = rows_or_basis if isinstance(rows_or_basis, str) else rows_or_basis[0].get("quality_basis", "agreement")
    return ("top-1 accuracy vs original (100 = same, 99 = one point lost)" if basis == "accuracy"
            else "top-1 agreement with original")


def top1_cell(score: dict) -> str:
    """A score's top-1 accuracy, or its top-1 agreement with the original when unlabeled."""
    return f"{score['top1_accuracy']:.1%}" if "top1_accuracy" in score else f"{score['top1_agreement']:.1%} agree"


def _accuracy_cells(r: dict) -> str:
    if "top1_accuracy" not in r:
        return ""
    lo, hi = r["top1_ci95"]
    return f"{r['top1_accuracy']:.1%} ({lo:.1%}-{hi:.1%}) | {r['top5_accuracy']:.1%} | "


def table(rows: list[dict]) -> str:
    labeled = "top1_accuracy" in rows[0]
    acc_head = "top-1 acc (95 % CI) | top-5 acc | " if labeled else ""
    head = (f"| candidate | size MB | params M | GFLOPs | img/s b1 | img/s b8 | x b8 | {acc_head}top-1 agree "
            "| top-5 overlap | mean KL | note |\n|" + "---|" * (13 if labeled else 11) + "\n")
    lines = []
    for r in rows:
        speed = (f"{r['img_s_b1']:.0f} | {r['img_s_b8']:.0f} | {r['speedup_b8']:.2f}" if "img_s_b1" in r
                 else "- | - | -")
        lines.append(f"| {r['name']} | {r['size_bytes'] / 1e6:.2f} | {r['params'] / 1e6:.3f} | {r['gflops']:.3f} "
                     f"| {speed} | {_accuracy_cells(r)}{r['top1_agreement']:.2%} | {r['top5_overlap']:.2%} "
                     f"| {r['mean_kl']:.5f} | {r['note']} |")
    return head + "\n".join(lines) + "\n"


def console(rows: list[dict]) -> None:
    print(f"  {'candidate':22s} {'MB':>6s} {'GFLOPs':>7s} {'b1':>6s} {'b8':>6s} {'x b8':>5s} {'top1':>7s} "
          f"{'top5':>7s} {'KL':>8s}")
    for r in rows:
        b1 = f"{r['img_s_b1']:6.0f}" if "img_s_b1" in r else f"{'-':>6s}"
        b8 = f"{r['img_s_b8']:6.0f} {r['speedup_b8']:5.2f}" if "img_s_b8" in r else f"{'-':>6s} {'-':>5s}"
        print(f"  {r['name']:22s} {r['size_bytes'] / 1e6:6.2f} {r['gflops']:7.3f} {b1} {b8} "
              f"{r['top1_agreement']:7.2%} {r['top5_overlap']:7.2%} {r['mean_kl']:8.5f}", flush=True)


def bar_chart(rows: list[dict], path: Path, title: str, budget: float | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    first = ([("top-1 accuracy (%)", [100 * r["top1_accuracy"] for r in rows])] if "top1_accuracy" in rows[0]
             else [])
    panels = first + [("top-1 agreement (%)", [100 * r["top1_agreement"] for r in rows]),
              ("GFLOPs / image", [r["gflops"] for r in rows]),
              ("size (MB)", [r["size_bytes"] / 1e6 for r in rows])]
    if "img_s_b8" in rows[0]:
        panels += [("img/s batch 1 (CPU, ORT)", [r["img_s_b1"] for r in rows]),
                   ("img/s batch 8 (CPU, ORT)", [r["img_s_b8"] for r in rows])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    colors = plt.cm.tab10(np.arange(len(rows)) % 10)
    for ax, (label, vals) in zip(axes, panels):
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}" if v < 2 else f"{v:.1f}" if v < 1000 else f"{v:.0f}", ha="center",
                    va="bottom", fontsize=7)
        if label.startswith("top-1 accuracy") and budget is not None:
            floor = 100 * (rows[0]["top1_accuracy"] - (1 - budget))
            ax.axhline(floor, color="red", ls="--", lw=1)
            ax.set_ylim(min(min(vals), floor) - 5, 101)
        elif label.startswith("top-1 agreement") and budget is not None and not first:
            ax.axhline(100 * budget, color="red", ls="--", lw=1)
            ax.set_ylim(min(min(vals), 100 * budget) - 5, 101)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prune_curve_chart(prune_log: dict, path: Path) -> None:
    """FLOPs reduction vs top-1 agreement for each threshold of the pruning sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(prune_log["curve"], key=lambda p: p["flops_reduction"])
    x = [100 * p["flops_reduction"] for p in pts]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    q = "quality" if "quality" in pts[0]["eval"] else "top1_agreement"
    ax.plot(x, [100 * p["eval"][q] for p in pts], "o-", label="evaluation split")
    ax.plot(x, [100 * p["search"][q] for p in pts], "s--", alpha=0.6, label="search split")
    ax.axhline(100 * prune_log["budget"], color="red", ls="--", lw=1, label=f"budget {100 * prune_log['budget']:.0f}")
    ax.set_xlabel("FLOPs removed (%)")
    ax.set_ylabel(quality_label(pts[0]["eval"].get("quality_basis", "agreement")), fontsize=8)
    ax.set_title("Structured pruning: FLOPs vs fidelity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distill_curve_chart(log: dict, path: Path) -> None:
    """The pruning curve after distillation: accuracy (pick and confirm splits, distilled and only
    refitted) against FLOPs removed and against the batch-8 speed-up measured side by side.
    Sensitivity-plan points make the curve; uniform cuts, if any, are shown apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(log["points"], key=lambda p: p["flops_reduction"])
    labeled = "top1_accuracy" in pts[0]["confirm"]
    key = "top1_accuracy" if labeled else "top1_agreement"
    groups = {"sensitivity plan": [p for p in pts if p["options"].get("plan")],
              "uniform cut": [p for p in pts if not p["options"].get("plan")]}
    colors = {"confirm": "tab:blue", "pick": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for split in ("confirm", "pick"):
        orig = 100 * pts[0][split].get("original_top1_accuracy", 1.0)
        for ax, x_of, x0 in ((axes[0], lambda p: 100 * p["flops_reduction"], 0.0),
                             (axes[1], lambda p: p["speedup_b8"], 1.0)):
            ax.plot([x0], [orig], "*", ms=11, color=colors[split])
            for g, (name, members) in enumerate(groups.items()):
                if not members:
                    continue
                style = "-" if g == 0 and ax is axes[0] else ""
                xs, dist = [x_of(p) for p in members], [100 * p[split][key] for p in members]
                refit = [100 * p["before_training"][split][key] for p in members]
                mark = "o" if g == 0 else "D"
                ax.plot(xs, dist, mark + style, color=colors[split], label=f"{split}, distilled ({name})")
                ax.plot(xs, refit, mark + (":" if style else ""), color=colors[split], alpha=0.45, mfc="none",
                        label=f"{split}, refit only ({name})")
    if labeled:
        orig = 100 * pts[0]["pick"]["original_top1_accuracy"]
        for ax in axes:
            ax.axhline(orig - 100 * (1 - log["budget"]), color="red", ls="--", lw=1, label="budget (pick split)")
    for p in pts:
        axes[0].annotate(p["point"], (100 * p["flops_reduction"], 100 * p["confirm"][key]),
                         fontsize=7, xytext=(3, -10), textcoords="offset points")
    axes[0].set_xlabel("FLOPs removed (%)")
    axes[1].set_xlabel("batch-8 speed-up vs the original (measured side by side)")
    axes[0].set_ylabel(("top-1 accuracy (%)" if labeled else "top-1 agreement with the original (%)")
                       + "; star: original")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6.5)
    from .train.distill import describe
    fig.suptitle(f"Pruning curve after distillation (picked on the pick split: {describe(log.get('picked'))})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quant_curve_chart(logs: dict, path: Path, budget: float) -> None:
    """Top-1 agreement (search split) vs number of layers in INT8, per quantization flavour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, log in logs.items():
        pts = sorted(log["curve"], key=lambda p: p["quantized_layers"])
        ax.plot([p["quantized_layers"] for p in pts], [100 * p.get("quality", p["top1_agreement"]) for p in pts], "o-",
                label=f"{name} ({log['method']}, {log.get('rounding', 'nearest')} rounding)")
    ax.axhline(100 * budget, color="red", ls="--", lw=1, label=f"budget {100 * budget:.0f}")
    ax.set_xlabel("layers quantized to INT8 (least KL per MAC first)")
    basis = next(iter(logs.values()))["curve"][0].get("quality_basis", "agreement")
    ax.set_ylabel(quality_label(basis) + ", search split", fontsize=8)
    ax.set_title("Accuracy-aware INT8: mixed-precision search")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], out_dir: Path, stem: str, title: str, budget: float, extra: dict | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"title": title, "budget": budget, "rows": rows,
                                                       **(extra or {})}, indent=2, default=str) + "\n")
    basis = ("top-1 accuracy at most {:.1f} points below the reference's ({:.1%}), on {} labeled evaluation images "
             "(95 % Wilson intervals)".format(100 * (1 - budget), rows[0]["top1_accuracy"], rows[0]["n_images"])
             if "top1_accuracy" in rows[0] else
             f"top-1 agreement >= {budget:.0%} on {rows[0]['n_images']} unlabeled evaluation images (agreement only: "
             "no labels, so no accuracy)")
    md = [f"# {title}", "",
          f"Reference: `{rows[0]['name']}`; budget: {basis}. Throughput: ONNX Runtime CPU, same threads, candidates "
          "measured in interleaved rounds (median); the machine is shared, so trust the ratios (x b8).", "",
          table(rows)]
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    bar_chart(rows, out_dir / f"{stem}.png", title, budget)
