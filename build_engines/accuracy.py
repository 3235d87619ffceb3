"""`python -m build_engines.accuracy`: top-1/top-5 accuracy of models on labeled photos, side by side.

Every model x preprocessing combination sees the same photos, each decoded from its file's
bytes by the server's own code (rtinfer.imaging), so the figures are what the pipeline
would answer. Writes accuracy.json, accuracy.md and accuracy.png (95 % Wilson intervals).

    python -m build_engines.accuracy --data ../shared/imagenet-sample-dev --split confirm
    python -m build_engines.accuracy --data DIR --model mine=path/to/model.onnx --crop center squash
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from rtinfer import imaging, labeled_photos

from . import paths, runtime


def default_models() -> dict:
    """The original, the installed variant, and every candidate the last build left behind."""
    models = {"original-fp32": paths.SOURCE_DIR / "model.onnx", "installed": paths.CPU_MODEL_DIR / "model.onnx"}
    log_p = paths.CPU_DIR / "cpu_log.json"
    if log_p.exists():
        for name, c in json.loads(log_p.read_text())["candidates"].items():
            models[name] = Path(c["path"])
    models["fp16-trt-onnx"] = paths.FP16_DIR / "model.onnx"
    models["int8-trt-qdq"] = paths.INT8_TRT_DIR / "model.onnx"
    return {k: v for k, v in models.items() if Path(v).exists()}


def load(files: list[Path], crop: str, draft: bool) -> tuple[np.ndarray, float]:
    """UINT8 crops of the files and the mean decode+crop time in ms."""
    t0 = time.perf_counter()
    out = np.stack([imaging.preprocess(f.read_bytes(), crop=crop, draft=draft) for f in files])
    return out, 1000 * (time.perf_counter() - t0) / len(files)


def evaluate(models: dict, files: list[Path], labels: np.ndarray, crops, drafts) -> list[dict]:
    rows = []
    for crop in crops:
        for draft in drafts:
            x, ms = load(files, crop, draft)
            ref = None
            for name, path in models.items():
                logits = runtime.logits(runtime.session(path), imaging.normalize(x))
                acc = labeled_photos.accuracy(logits, labels)
                ref = logits if ref is None else ref
                row = {"model": name, "path": str(path), "crop": crop, "jpeg_draft": draft,
                       "decode_ms": round(ms, 2), **acc,
                       "vs_first_points":
                           100 * (acc["top1_accuracy"] - labeled_photos.accuracy(ref, labels)["top1_accuracy"]),
                       "agreement_with_first": float(np.mean(ref.argmax(1) == logits.argmax(1)))}
                rows.append(row)
                print(f"  {name:28s} crop {crop:6s} draft {str(draft):5s} top-1 {acc['top1_accuracy']:.2%} "
                      f"[{acc['top1_ci95'][0]:.1%}, {acc['top1_ci95'][1]:.1%}]  top-5 {acc['top5_accuracy']:.2%}  "
                      f"{row['vs_first_points']:+.1f} pt vs {next(iter(models))}", flush=True)
    return rows


def write(rows: list[dict], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2) + "\n")
    md = [f"# {title}", "", "| model | crop | JPEG draft | top-1 | 95 % CI | top-5 | vs first (points) "
          "| agreement with first | decode ms/img |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['crop']} | {r['jpeg_draft']} | {r['top1_accuracy']:.2%} | "
                  f"{r['top1_ci95'][0]:.1%} - {r['top1_ci95'][1]:.1%} | {r['top5_accuracy']:.2%} | "
                  f"{r['vs_first_points']:+.1f} | {r['agreement_with_first']:.2%} | {r['decode_ms']} |")
    (out / "accuracy.md").write_text("\n".join(md) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4))
    acc = [100 * r["top1_accuracy"] for r in rows]
    err = np.array([[100 * (r["top1_accuracy"] - r["top1_ci95"][0]), 100 * (r["top1_ci95"][1] - r["top1_accuracy"])]
                    for r in rows]).T
    ax.bar(range(len(rows)), acc, yerr=err, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(rows)), [f"{r['model']}\n{r['crop']}{'' if r['jpeg_draft'] else ' nodraft'}"
                                     for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("top-1 accuracy (%), 95 % CI")
    ax.set_ylim(max(0, min(acc) - 15), 100)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m build_engines.accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="labeled photos (<wnid>_*.JPEG or <wnid>/*.JPEG)")
    ap.add_argument("--split", choices=labeled_photos.SPLITS, default="confirm",
                    help="the build chooses on 'choose' and confirms on 'confirm' (default)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="model to evaluate (repeatable; default: original, installed and the build's candidates)")
    ap.add_argument("--crop", nargs="+", default=[imaging.DEFAULT_CROP], choices=imaging.CROPS)
    ap.add_argument("--draft", nargs="+", default=["on"], choices=["on", "off"], help="JPEG decode at reduced scale")
    ap.add_argument("--out", type=Path, default=paths.BUILD.parent / "accuracy")
    args = ap.parse_args(argv)
    files, labels = labeled_photos.find(args.data)
    if labels is None:
        raise SystemExit(f"{args.data}: images must be named by ImageNet wnid to be scored")
    files, labels = labeled_photos.select(files, labels, args.split)
    models = dict(m.split("=", 1) for m in args.model) if args.model else default_models()
    print(f"[accuracy] {len(files)} photos ({args.split} split of {args.data}), {len(models)} models", flush=True)
    rows = evaluate(models, files, labels, args.crop, [d == "on" for d in args.draft])
    write(rows, args.out, f"Top-1 on {len(files)} labeled photos ({args.split} split)")
    print(f"[accuracy] {args.out / 'accuracy.md'} (+ .json, .png)", flush=True)


if __name__ == "__main__":
    main()
