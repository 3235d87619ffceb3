"""Prune the student, distil it from the teacher on a cached pool, export it; pick a point of the curve.

Thin glue over student / teacher / loop / export, for the build's `distill` stage. Each point of
the pruning curve (a sensitivity plan of the prune stage, or a uniform keep fraction) is pruned,
refitted on the pool and distilled alike. Training
sees only the "fit" half of the choose classes (+ the bundled photos, unlabeled); the build picks
a point on the other half ("pick"), classes training never saw, and reports on "confirm", so
neither the pick nor the report is flattered by what training memorised.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rtinfer import imaging

from . import export, student, teacher
from .loop import train


@dataclass(frozen=True)
class Options:
    keep: float = 1.0          # fraction of each block's expanded channels kept (multiples of 8); 1.0 = no pruning
    plan: dict | None = None   # or the ONNX pruning stage's plan (block -> channels removed / "remove"), if given
    steps: int = 40            # optimizer steps (the budget); time_cap_s stops earlier on a slow machine
    batch: int = 32
    # training resolution: 160 (3x faster) taught the 224 px model worse than nothing
    # (docs/engines.md "Distillation measured")
    size: int = 224
    # mixup and cutmix probability each: 0.25 lowered held-out top-1 (docs/engines.md "Distillation measured")
    mix: float = 0.0
    views: int = 4             # pool views per photo (the first is the served centre crop)
    lr: float = 1e-4           # 3e-4 with alpha 0.5 raised the trained classes but lowered the held-out ones
    # teacher term only by default: measured to generalise to held-out classes (docs/engines.md "Distillation measured")
    alpha: float = 0.0
    tau: float = 2.0
    teacher: str = "lite0"     # or "lite2" (EfficientNet-Lite2 at 260 px, the cascade's big model; stage big)
    seed: int = 0
    time_cap_s: float = 540.0
    threads: int = 0           # 0: all cores (the build runs alone); tests use 1

    def key(self) -> dict:
        """What the result depends on (the time cap only cuts it short; it is logged)."""
        return {k: v for k, v in asdict(self).items() if k not in ("time_cap_s", "threads")}


def make_pool(files: list, labels: list, teacher_onnx: Path, opts: Options, out: Path,
              teacher_size: int = 224) -> dict:
    return teacher.build_pool(files, labels, teacher_onnx, opts.views, opts.size, opts.seed, out,
                              teacher_size=teacher_size)


def run(pool: dict, out: Path, opts: Options, ckpt: Path | None = None) -> dict:
    """Prune (ranking + least-squares refit on every view of the pool), distil on the pool, export
    ``out`` (FP32 NCHW ONNX) and the untrained student beside it (``start.onnx``). Returns the training log."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model = student.load()
    counts = student.plan_counts(model, opts.plan) if opts.plan else student.uniform_counts(model, opts.keep)
    kept = student.prune(model, counts, torch.from_numpy(imaging.normalize(pool["x"])))
    export.to_onnx(model, out.with_name("start.onnx"))   # the student before training, to show what training did
    log = train(model, pool, steps=opts.steps, batch=opts.batch, lr=opts.lr, alpha=opts.alpha, tau=opts.tau,
                seed=opts.seed, ckpt=ckpt, time_limit_s=opts.time_cap_s, mix_p=(opts.mix, opts.mix))
    export.to_onnx(model, out)
    return {"options": asdict(opts), "kept_channels": kept, **log}


def pick_point(points: list, budget: float) -> int | None:
    """Index of the student with the most FLOPs removed whose quality on the pick split is within
    ``budget`` (fidelity.compare's ``quality``: 1 + its top-1 - the original's), the more accurate
    on a tie (a point's distilled and refit-only students); None if none is."""
    ok = [i for i, p in enumerate(points) if p["pick"]["quality"] >= budget]
    return max(ok, key=lambda i: (points[i]["flops_reduction"], points[i]["pick"]["quality"])) if ok else None


def describe(student: dict | None) -> str:
    """One student of the curve in words, for logs and reports."""
    if student is None:
        return "none within budget"
    return f"{student['point']}, {'distilled' if student['trained'] else 'refit only'}"
