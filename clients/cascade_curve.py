"""`python -m clients.cascade_curve` (`make cascade-curve`): the cascade's accuracy/escalation/latency trade-off.

Two kinds of figures, kept apart in the output:

- **offline** (every threshold of the grid, both confidence metrics): top-1 with its 95 % Wilson
  interval and the share escalated, from the two installed classifiers' logits on the labeled
  photos (``rtinfer.imaging`` crops: 224 for the edge model, 260 for the big one), combined as
  the cascade combines them (``rtinfer.routing.Policy``);
- **served** (a few thresholds): mean and p99 latency of one client sending each sealed photo
  through a real server running the cascade with that threshold, and the served top-1.

The threshold is chosen on the ``choose`` split for a stated goal (default: within 0.5 point of
big-only top-1, escalating as few requests as that needs); the table reports the ``confirm`` split.
Writes ``build/cascade/cascade_curve.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from clients.classify import PipelineClient
from clients.evaluate import reference
from rtinfer import keyring, labeled_photos, routing
from rtinfer.launch.server import ROOT, TritonServer, repository_with
from rtinfer.postprocess import softmax

REPO = ROOT / "model_repository"
EDGE, BIG = REPO / "classifier_onnx" / "1" / "model.onnx", REPO / "classifier_big" / "1" / "model.onnx"
GRID = tuple(round(float(t), 3) for t in np.arange(0.0, 1.0001, 0.025))
ALWAYS = 1.01  # above any probability: every request escalates (big-only through the cascade)
SERVER_MODELS = ("cascade", "classifier_onnx", "classifier_big")


def logits(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(edge logits, big logits) on the photos, each under its own crop."""
    return reference(EDGE, files, 224), reference(BIG, files, 260)


def combine(small: np.ndarray, big: np.ndarray, labels: np.ndarray, metric: str, threshold: float) -> dict:
    """The cascade's answers at one threshold: top-1 (Wilson 95 %) and the share escalated."""
    escalate, _ = routing.Policy(metric, threshold).decide(softmax(small))
    pred = np.where(escalate, big.argmax(1), small.argmax(1))
    hits = int(np.sum(pred == labels))
    return {"metric": metric, "threshold": threshold, "top1": hits / len(labels),
            "top1_ci95": labeled_photos.wilson(hits, len(labels)), "escalated": float(escalate.mean()),
            "n": len(labels)}


def grid(small, big, labels) -> list[dict]:
    return [combine(small, big, labels, m, t) for m in routing.METRICS for t in GRID + (ALWAYS,)]


def choose(rows: list[dict], big_only: float, within_points: float) -> dict:
    """Fewest escalations among the settings within ``within_points`` of big-only top-1 (ties: higher top-1,
    then the lower threshold)."""
    ok = [r for r in rows if r["top1"] >= big_only - within_points / 100 - 1e-12]
    return min(ok, key=lambda r: (r["escalated"], -r["top1"], r["threshold"]))


def served(files: list[Path], labels: np.ndarray, metric: str, threshold: float, key: bytes, key_id: str,
           ring_path: Path, work: Path, warmup: int = 5) -> dict:
    """One client, one request at a time, through a real server whose cascade uses this threshold."""
    repo = repository_with(work / f"repo-{metric}-{threshold}", {"cascade": {"threshold": str(threshold),
                                                                            "confidence_metric": metric}})
    audit = work / f"audit-{metric}-{threshold}"
    lat, pred = [], []
    with TritonServer(repo, models=SERVER_MODELS, keyring=str(ring_path), audit_dir=str(audit),
                      workdir=work / "triton") as srv:
        client = PipelineClient(srv.grpc_url, protocol="grpc", key=key, key_id=key_id, client_id="cascade-curve",
                                pipeline="cascade")
        for f in files[:warmup]:
            client.classify(f.read_bytes(), top_k=1)
        for f in files:
            data = f.read_bytes()
            t0 = time.perf_counter()
            r = client.classify(data, top_k=1)
            lat.append((time.perf_counter() - t0) * 1e3)
            pred.append(r.predictions[0].index)
        client.close()
    routes = [json.loads(line).get("route") for p in sorted(audit.glob("cascade_*.jsonl"))
              for line in p.read_text().splitlines() if '"event":"served"' in line]
    hits = int(np.sum(np.array(pred) == labels))
    lat_a = np.array(lat)
    return {"metric": metric, "threshold": threshold, "served_top1": hits / len(labels),
            "served_top1_ci95": labeled_photos.wilson(hits, len(labels)), "mean_ms": float(lat_a.mean()),
            "p50_ms": float(np.percentile(lat_a, 50)), "p99_ms": float(np.percentile(lat_a, 99)),
            "escalated_served": sum(r in (routing.CLOUD, routing.EDGE_FALLBACK) for r in routes[warmup:]) / len(files),
            "routes": {k: routes[warmup:].count(k) for k in (routing.EDGE, routing.CLOUD, routing.EDGE_FALLBACK)},
            "n": len(files), "predictions": pred}


def chart(rows_confirm: list[dict], chosen: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for metric, style in (("top1", "-o"), ("margin", "-s")):
        rs = [r for r in rows_confirm if r["metric"] == metric and r["threshold"] <= 1]
        a.plot([r["escalated"] * 100 for r in rs], [r["top1"] * 100 for r in rs], style, ms=3,
               label=f"cascade ({metric})")
        b.plot([r["threshold"] for r in rs], [r["escalated"] * 100 for r in rs], style, ms=3, label=metric)
    small = next(r for r in rows_confirm if r["threshold"] == 0.0)
    big = next(r for r in rows_confirm if r["threshold"] == ALWAYS)
    a.axhline(small["top1"] * 100, color="grey", ls=":", label="small only (Lite0)")
    a.axhline(big["top1"] * 100, color="black", ls="--", label="big only (Lite2)")
    c = next(r for r in rows_confirm if r["metric"] == chosen["metric"] and r["threshold"] == chosen["threshold"])
    a.plot([c["escalated"] * 100], [c["top1"] * 100], "r*", ms=14, label=f"chosen: {c['metric']} >= {c['threshold']}")
    a.set_xlabel("share escalated to the big model (%)")
    a.set_ylabel("top-1 on the confirm split (%)")
    a.legend(fontsize=7)
    b.axvline(chosen["threshold"], color="red", ls=":")
    b.set_xlabel("threshold")
    b.set_ylabel("share escalated (%)")
    b.legend(fontsize=7)
    fig.suptitle("Cascade Lite0 -> Lite2: accuracy against escalation (offline, confirm split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def _ci(ci) -> str:
    return f"{ci[0] * 100:.1f}-{ci[1] * 100:.1f}"


def markdown(doc: dict) -> str:
    c = doc["chosen"]
    out = ["# Cascade trade-off (Lite0 edge, Lite2 cloud)\n",
           f"Goal: {doc['goal']}. Chosen on the choose split ({doc['n']['choose']} photos): "
           f"**{c['metric']} >= {c['threshold']}** (choose split: top-1 {_pct(c['top1'])}, escalated "
           f"{_pct(c['escalated'])}; big-only {_pct(doc['choose_big_only'])}).\n",
           f"## Served (one client, sequential, gRPC, confirm split, {doc['n']['confirm']} photos)\n",
           "| setting | served top-1 (95 % CI) | escalated | mean ms | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for s in doc["served"]:
        out.append(f"| {s['label']} | {_pct(s['served_top1'])} ({_ci(s['served_top1_ci95'])}) | "
                   f"{_pct(s['escalated_served'])} | {s['mean_ms']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} |")
    out += ["", "## Offline grid (confirm split; threshold 1.01 = always escalate)\n",
            "| metric | threshold | top-1 (95 % CI) | escalated |", "|---|---|---|---|"]
    for r in doc["confirm"]:
        if r["threshold"] in (0.0, ALWAYS) or round(r["threshold"] * 40) % 2 == 0:
            mark = " **chosen**" if (r["metric"], r["threshold"]) == (c["metric"], c["threshold"]) else ""
            out.append(f"| {r['metric']} | {r['threshold']}{mark} | {_pct(r['top1'])} ({_ci(r['top1_ci95'])}) "
                       f"| {_pct(r['escalated'])} |")
    out += ["", "![curve](cascade_curve.png)", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.cascade_curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "imagenet-sample-dev")
    p.add_argument("--within-points", type=float, default=0.5,
                   help="goal: top-1 within this of big-only (choose split)")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "cascade")
    p.add_argument("--no-serve", action="store_true", help="offline figures only (no latency)")
    p.add_argument("--extra-thresholds", type=float, nargs="*", default=[], help="also serve these (chosen metric)")
    args = p.parse_args(argv)
    files, labels = labeled_photos.find(args.data)
    if labels is None:
        raise SystemExit(f"{args.data}: photos must be named by ImageNet wnid")
    split = {s: labeled_photos.select(files, labels, s) for s in ("choose", "confirm")}
    rows = {}
    for s, (f, y) in split.items():
        small, big = logits(f)
        rows[s] = grid(small, big, y)
    choose_big = next(r for r in rows["choose"] if r["threshold"] == ALWAYS)["top1"]
    chosen = choose(rows["choose"], choose_big, args.within_points)
    doc = {"goal": f"top-1 within {args.within_points} point of big-only on the choose split, fewest escalations",
           "chosen": chosen, "choose_big_only": choose_big, "n": {s: len(y) for s, (_, y) in split.items()},
           "choose": rows["choose"], "confirm": rows["confirm"], "served": [],
           "note": "offline = both installed models' logits combined per threshold; served = through a real server"}
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_serve:
        f, y = split["confirm"]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            ring_path = keyring.write_new(work / "keyring.json", key_ids=("curve",))
            key = keyring.Keyring.load(ring_path).key("curve")
            settings = [("small only (threshold 0)", chosen["metric"], 0.0),
                        (f"cascade, chosen ({chosen['metric']} >= {chosen['threshold']})", chosen["metric"],
                         chosen["threshold"]),
                        *[(f"cascade ({chosen['metric']} >= {t})", chosen["metric"], t) for t in args.extra_thresholds],
                        ("big only (threshold 1.01)", chosen["metric"], ALWAYS)]
            for label, metric, t in settings:
                s = served(f, y, metric, t, key, "curve", ring_path, work)
                s["label"] = label
                print(f"[cascade-curve] {label}: top-1 {_pct(s['served_top1'])}, escalated "
                      f"{_pct(s['escalated_served'])}, mean {s['mean_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms",
                      flush=True)
                doc["served"].append(s)
    (args.out / "cascade_curve.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    (args.out / "cascade_curve.md").write_text(markdown(doc))
    chart(rows["confirm"], chosen, args.out / "cascade_curve.png")
    print(f"[cascade-curve] chosen {chosen['metric']} >= {chosen['threshold']}; {args.out / 'cascade_curve.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
