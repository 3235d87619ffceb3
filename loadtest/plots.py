"""The PNG figures: per-stage latency breakdown with percentiles over time, and latency vs throughput."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PARTS = (("queue_ms", "queue", "#d62728"), ("input_ms", "compute input", "#9467bd"),
         ("infer_ms", "compute infer", "#1f77b4"), ("output_ms", "compute output", "#2ca02c"))


def _history(path: Path):
    """Aggregated rows of Locust's _stats_history.csv: seconds since start, users, p50, p95, p99."""
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Name"] != "Aggregated" or row["50%"] in ("N/A", "", "0"):
                continue
            rows.append((int(row["Timestamp"]), int(row["User Count"]), float(row["50%"]),
                         float(row["95%"]), float(row["99%"]), float(row["Requests/s"])))
    t0 = rows[0][0] if rows else 0
    return [(t - t0, *rest) for t, *rest in rows]


def breakdown(stages: list, history_csv: Path, out: Path, title: str, ensembles=("pipeline",)) -> Path:
    """Left: average time per request in each stage, stacked by part (an ensemble as one end-to-end bar,
    its own compute numbers are sums over its steps); right: p50/p95/p99 over time."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.6), gridspec_kw={"width_ratios": [1, 1.25]})
    names = [s.model for s in stages]
    steps = [s.model not in ensembles for s in stages]
    left = [0.0] * len(stages)
    for key, label, color in PARTS:
        vals = [getattr(s, key) if step else 0.0 for s, step in zip(stages, steps)]
        ax.barh(names, vals, left=left, label=label, color=color)
        left = [a + b for a, b in zip(left, vals)]
    other = [max(0.0, s.request_ms - lft) if step else 0.0 for s, lft, step in zip(stages, left, steps)]
    ax.barh(names, other, left=left, label="other (scheduling, transfers)", color="#bbbbbb")
    ax.barh(names, [0.0 if step else s.request_ms for s, step in zip(stages, steps)],
            label="ensemble, end to end in server", color="#17becf")
    for i, s in enumerate(stages):
        ax.text(max(s.request_ms, left[i]) * 1.01, i, f"{s.request_ms:.1f} ms, batch {s.avg_batch:.2f}",
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("average ms per request inside the server (batched compute counts for each request)")
    ax.set_title("Per-stage latency (Triton metrics, before/after diff)")
    ax.set_xlim(0, max([s.request_ms for s in stages] + [1]) * 1.45)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    hist = _history(history_csv) if history_csv.exists() else []
    if hist:
        t = [h[0] for h in hist]
        for idx, label, style in ((2, "p50", "-"), (3, "p95", "--"), (4, "p99", ":")):
            bx.plot(t, [h[idx] for h in hist], style, label=label, linewidth=1.6)
        bx.set_ylabel("client-side latency ms (Locust, rolling window)")
        bx.set_xlabel("seconds since start")
        ux = bx.twinx()
        ux.step(t, [h[1] for h in hist], where="post", color="#999999", alpha=0.6, label="users")
        ux.plot(t, [h[5] for h in hist], color="#8c564b", alpha=0.6, linewidth=1, label="req/s")
        ux.set_ylabel("users / requests per second")
        lines = bx.get_legend_handles_labels()
        more = ux.get_legend_handles_labels()
        bx.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    bx.set_title("Latency percentiles over time")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def latency_vs_throughput(results: dict, out: Path, title: str) -> Path:
    """One curve per arm: x = throughput, y = p50 (solid) and p99 (dashed); points labelled by concurrency."""
    fig, ax = plt.subplots(figsize=(10, 6))
    for arm, levels in results.items():
        xs = [lv["throughput"] for lv in levels]
        line, = ax.plot(xs, [lv["p50_ms"] for lv in levels], "-o", label=f"{arm} p50", markersize=4)
        ax.plot(xs, [lv["p99_ms"] for lv in levels], "--", color=line.get_color(), label=f"{arm} p99", alpha=0.8)
        for lv in levels:
            ax.annotate(str(lv["concurrency"]), (lv["throughput"], lv["p50_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3), color=line.get_color())
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency ms (log)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title + "\n(numbers at points = concurrent requests)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def request_breakdown(split: dict, single: dict, out: Path) -> Path:
    """One request's critical path per path (stacked segments, Triton trace + client clock, medians),
    beside bare ONNX Runtime doing decode + inference on the same photo."""
    paths = list(split["paths"])
    segs = [k for k in split["paths"][paths[0]]["median_ms"] if k != "total"]
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(14, 2.2 + 0.7 * (len(paths) + 1)))
    rows = [*paths, "bare ORT (in-process)"]
    for i, seg in enumerate(segs):
        vals = [split["paths"][p]["median_ms"][seg] for p in paths] + [0.0]
        left = [sum(split["paths"][p]["median_ms"][s] for s in segs[:i]) for p in paths] + [0.0]
        ax.barh(rows, vals, left=left, color=cmap(i % 20), label=seg)
    inside = split.get("inside_ms", {})
    decode = sum(inside.get(k, 0.0) for k in ("decode", "to_rgb", "resize_crop"))
    ax.barh(rows[-1:], [decode], color="#8c564b", hatch="//", label="bare: decode + crop")
    ax.barh(rows[-1:], [inside.get("ort", 0.0)], left=[decode], color="#17becf", hatch="//", label="bare: ORT")
    if single:
        ref = single[single.get("reference", "ort_with_decode")]["p50_ms"]
        ax.axvline(ref + 2.0, color="k", ls="--", lw=1)
        ax.text(ref + 2.0, len(rows) - 0.5, " target: bare ORT decode+inference p50 + 2 ms", va="bottom", fontsize=8)
    ax.set_xlabel("ms (medians per segment; they need not add up to the median total)")
    ax.set_title("Where one request's time goes (chelsea, one client)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
