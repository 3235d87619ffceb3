"""The flags of `python -m build_engines` (`make engines`): ``parser()`` builds them, ``parse_args()`` reads
them and resolves the quality budget every stage checks against."""
from __future__ import annotations

import argparse
from pathlib import Path

# --help's description: the stages, in the order `python -m build_engines` runs them.
DESCRIPTION = """\
`python -m build_engines`: run every stage of `make engines`, skipping those already up to date.

source -> images -> prune -> distill (pruned student taught by the original) -> qat (INT8-aware training of the
original, CPU and TensorRT flavours) -> cpu (INT8 / FP32, fastest within budget) -> fp16, int8_trt
(precision-explicit ONNX for TensorRT) -> report -> install -> big (EfficientNet-Lite2, the cascade's
cloud classifier) -> TensorRT engines (GPU hosts).
"""
QAT_STEPS = 40
DISTILL_FLOPS = [0.05, 0.1, 0.2, 0.3]   # the pruning curve's points (docs/engines.md "Distillation measured")


def _floats(v: str) -> list:
    return [float(k) for k in v.split(",") if k]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m build_engines", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-dir", type=Path, help="folder of images for INT8 calibration (default: packaged photos)")
    ap.add_argument("--eval-dir", type=Path, help="folder of images for fidelity evaluation (default: packaged photos)")
    ap.add_argument("--labeled-dir", type=Path,
                    help="labeled photos (<wnid>_*.JPEG or <wnid>/*.JPEG): split by class into what the build "
                         "chooses on and what it confirms on; budgets are then in top-1 accuracy")
    ap.add_argument("--budget-points", type=float, default=1.0,
                    help="with labels: most top-1 accuracy points a variant may lose against the original")
    ap.add_argument("--budget", type=float, default=None,
                    help="quality floor (default: 1 - budget-points/100 with labels, 0.97 top-1 agreement without)")
    ap.add_argument("--margin", type=float, default=0.005, help="extra quality required on the search split")
    ap.add_argument("--eval-n", type=int, default=400, help="evaluation images (packaged set)")
    ap.add_argument("--calib-n", type=int, default=256, help="calibration images (packaged set)")
    ap.add_argument("--scan-n", type=int, default=64,
                    help="calibration images used to score each layer/block in sensitivity scans")
    ap.add_argument("--calib-methods", nargs="+", default=["minmax", "percentile"],
                    choices=["minmax", "percentile"], help="INT8 calibration methods to compare")
    ap.add_argument("--int8-from-unpruned", action="store_true",
                    help="also try INT8 of the unpruned model as a CPU candidate (about +4 min)")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="distillation steps per point of the pruning curve (batch 32; 0 = no distill stage, the "
                         "default: it adds about 12-15 min; docs/engines.md \"Distillation measured\" used 40)")
    ap.add_argument("--distill-flops", type=_floats, default=DISTILL_FLOPS,
                    help="the pruning curve: comma-separated FLOPs reductions; each point takes the prune stage's "
                         "sensitivity plan nearest to it (channel counts rounded to multiples of 8)")
    ap.add_argument("--distill-keep", type=_floats, default=[],
                    help="more points, each block keeping this fraction of its expanded channels (uniform cut)")
    ap.add_argument("--distill-size", type=int, default=224, help="training resolution (the teacher sees 224)")
    ap.add_argument("--distill-mix", type=float, default=0.0,
                    help="mixup and cutmix probability each (0.25 measured worse)")
    ap.add_argument("--distill-views", type=int, default=4, help="augmented views per photo in the teacher cache")
    ap.add_argument("--distill-alpha", type=float, default=0.0,
                    help="weight of the hard-label CE term (labeled photos only); the rest is the teacher's KL")
    ap.add_argument("--distill-lr", type=float, default=1e-4, help="AdamW learning rate (cosine, 5 %% warm-up)")
    ap.add_argument("--distill-teacher", choices=("lite0", "lite2"), default="lite0",
                    help="teacher: the FP32 original (lite0) or EfficientNet-Lite2 at 260 px (the cascade's big model)")
    ap.add_argument("--distill-minutes", type=float, default=9.0,
                    help="time cap for the training loop (stops early on a slow machine; logged)")
    ap.add_argument("--qat-steps", type=int, default=QAT_STEPS,
                    help="quantization-aware training steps per flavour (batch 16; 0 = no qat stage); "
                         "docs/engines.md \"QAT measured\" gives the measured run")
    ap.add_argument("--qat-size", type=int, default=224, help="QAT training resolution (the teacher sees 224)")
    ap.add_argument("--qat-lr", type=float, default=1e-5, help="QAT AdamW learning rate (cosine, 5 %% warm-up)")
    ap.add_argument("--qat-minutes", type=float, default=5.0,
                    help="time cap per flavour's training loop (stops early on a slow machine; logged)")
    ap.add_argument("--quick", action="store_true",
                    help="export only, and install it unless a full build's variant is installed (make demo)")
    return ap


def resolve_budget(args) -> float:
    """One number every stage checks `quality` against (fidelity.compare says what quality is)."""
    if args.budget is not None:
        return args.budget
    return 1.0 - args.budget_points / 100.0 if args.labeled_dir else 0.97


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with ``budget`` resolved (``--budget``, else from ``--budget-points`` with labels, else 0.97)."""
    args = parser().parse_args(argv)
    args.budget = resolve_budget(args)
    return args
