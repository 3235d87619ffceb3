"""`python -m build_engines`: run every stage of `make engines`, skipping those already up to date.

The stages, in order, are in ``cli.DESCRIPTION`` (``--help`` prints them); ``cli`` holds the flags.
"""
import functools
import hashlib
import inspect
import json
import time
from pathlib import Path

import numpy as np
import onnx

from . import cli, evaluate, images, installed, paths, source_model
from .hashing import code_hash, sha256_file
from .install import MANIFEST as INSTALLED_MANIFEST, MODEL as INSTALLED_MODEL, PORTABLE as INSTALLED_PORTABLE, install
from .manifest import write_manifest
from .report import top1_cell
from .sanity import check_sanity
from .stages import run_stage
from .uint8_front import wrap_file

MEASURE_CODE = ("evaluate", "runtime", "fidelity", "cost", "uint8_front")
SCORE_KEYS = ("quality", "quality_basis", "top1_accuracy", "top1_ci95", "top5_accuracy", "top5_ci95",
              "original_top1_accuracy", "n_labeled", "top1_agreement", "top5_overlap", "mean_kl", "n_images")


def score_figures(score: dict) -> dict:
    return {k: score[k] for k in SCORE_KEYS if k in score}


def own_code(fn) -> str:
    """Hash of a stage function's own source: editing one stage here rebuilds that stage only."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def stage_source(weights_sha: str) -> Path:
    out = paths.SOURCE_DIR / "model.onnx"
    man = paths.SOURCE_DIR / "manifest.json"

    def build():
        source_model.export(out)
        sanity = check_sanity(out)
        write_manifest(out, man, source_weights_sha256=weights_sha, precision="fp32", variant="source",
                       extra={"opset": 17, "sanity": sanity})
        print(f"[source] exported {out} ({out.stat().st_size / 1e6:.1f} MB), sanity {sanity}", flush=True)

    run_stage("source", paths.SOURCE_DIR, {"stage_code": own_code(stage_source),
        "weights": weights_sha, "code": code_hash("source_model", "graph_clean", "manifest", "sanity", "preprocess"),
        "opset": 17}, [out, man], build)
    return out


def stage_images(args) -> tuple:
    """uint8 crops (+ labels when the folder has them) for choosing (calib/search) and confirming (eval)."""
    from rtinfer import labeled_photos
    if args.labeled_dir:
        files, labels = labeled_photos.find(args.labeled_dir)
        if labels is None:
            raise SystemExit(f"{args.labeled_dir}: not every image is named by an ImageNet wnid "
                             "(<wnid>_*.JPEG or <wnid>/*.JPEG); use --calib-dir/--eval-dir for unlabeled folders")
        calib_files, calib_y = labeled_photos.select(files, labels, "choose")
        eval_files, eval_y = labeled_photos.select(files, labels, "confirm")
    else:
        calib_y = eval_y = None
        calib_files = images.folder_images(args.calib_dir) if args.calib_dir else images.packaged_photos()
        eval_files = images.folder_images(args.eval_dir) if args.eval_dir else images.packaged_photos()
    outs = [paths.IMAGES_DIR / f for f in ("calib.npy", "eval.npy", "calib_labels.npy", "eval_labels.npy")]

    def build():
        if args.labeled_dir:
            ca, ev = images.user_set(calib_files), images.user_set(eval_files)
        else:
            ev = (images.user_set(eval_files, args.eval_n) if args.eval_dir
                  else images.expanded_set(eval_files, args.eval_n, images.EVAL_SEED, include_full=True))
            ca = (images.user_set(calib_files, args.calib_n) if args.calib_dir
                  else images.expanded_set(calib_files, args.calib_n, images.CALIB_SEED, include_full=False))
            ca = images.disjoint(ca, ev)
        for path, arr in zip(outs, (ca, ev, calib_y, eval_y)):
            np.save(path, arr if arr is not None else np.full(0, -1, dtype=np.int64))
        kind = (f"labeled, split by class from {args.labeled_dir}" if args.labeled_dir
                else "unlabeled: agreement with the original only")
        print(f"[images] calibration/search {len(ca)}, evaluation {len(ev)} images (disjoint; {kind})", flush=True)

    run_stage("images", paths.IMAGES_DIR, {"stage_code": own_code(stage_images),
        "calib": images.source_fingerprint(calib_files), "eval": images.source_fingerprint(eval_files),
        "labeled": bool(args.labeled_dir), "calib_user": bool(args.calib_dir), "eval_user": bool(args.eval_dir),
        "calib_n": args.calib_n, "eval_n": args.eval_n,
        "code": code_hash("images", "preprocess"), "imaging": _imaging_hash()}, outs, build)
    return outs


def _imaging_hash() -> str:
    """The served preprocessing makes the build's images: changing it rebuilds them."""
    from rtinfer import imaging
    return sha256_file(Path(imaging.__file__))


class Data:
    """Image splits, labels, and the original model's logits on them, loaded only if a stage needs them."""

    def __init__(self, source: Path, image_files: list, scan_n: int):
        self.source, self.scan_n = source, scan_n
        self.calib_p, self.eval_p, self.calib_y_p, self.eval_y_p = image_files
        self.sha = "".join(sha256_file(p) for p in image_files) + f":{scan_n}"

    @functools.cached_property
    def calib(self):
        return images.to_batch(np.load(self.calib_p))

    @functools.cached_property
    def eval(self):
        return images.to_batch(np.load(self.eval_p))

    @functools.cached_property
    def calib_y(self):
        y = np.load(self.calib_y_p)
        return y if len(y) else None

    @functools.cached_property
    def eval_y(self):
        y = np.load(self.eval_y_p)
        return y if len(y) else None

    @property
    def search(self):
        """Candidates are chosen on the calibration split; the evaluation split only confirms."""
        return self.calib

    @functools.cached_property
    def eval_ref(self):
        return evaluate.Reference(evaluate.run(self.source, self.eval), self.eval_y)

    @functools.cached_property
    def search_ref(self):
        return evaluate.Reference(evaluate.run(self.source, self.search), self.calib_y)

    @functools.cached_property
    def pick(self) -> tuple:
        """(images, Reference, basis): the choose split's "pick" classes, which distillation never
        trains on (labeled builds); without labels the whole search split (in-sample, said so)."""
        if self.calib_y is None:
            return self.search, self.search_ref, "search split (unlabeled: the training photos' own crops)"
        from rtinfer import labeled_photos
        m = np.array([labeled_photos.choose_part(int(y)) == "pick" for y in self.calib_y])
        return self.calib[m], self.search_ref[m], "pick classes (half of the choose split, never trained on)"


def stage_prune(src: Path, data: Data, args, weights_sha: str) -> Path:
    d = paths.PRUNED_DIR
    out, man, log_p = d / "model.onnx", d / "manifest.json", d / "prune_log.json"

    def build():
        from . import prune, report
        pruned, log = prune.prune(src, data.calib, data.search, data.search_ref, data.eval, data.eval_ref,
                                  args.budget, args.margin, data.scan_n)
        onnx.save(pruned, str(out))
        score = evaluate.score(out, data.eval, data.eval_ref)
        check_sanity(out)
        log["final"] = score
        log_p.write_text(json.dumps(log, indent=2, default=str) + "\n")
        report.prune_curve_chart(log, paths.PRUNED_DIR / "prune_curve.png")
        from .cost import summary
        base, now = summary(src), summary(out)
        figures = {**score, "gflops": now["gflops"], "params": now["params"],
                   "flops_reduction": 1 - now["macs"] / base["macs"], "budget": args.budget}
        write_manifest(out, man, source_weights_sha256=weights_sha, precision="fp32", variant="pruned",
                       figures=figures, extra={"plan": log["chosen_plan"], "log": log_p.name})
        print(f"[prune] FLOPs -{figures['flops_reduction']:.1%}, eval quality "
              f"{score['quality']:.2%} ({score['quality_basis']}), curve in {paths.PRUNED_DIR / 'prune_curve.png'}",
              flush=True)

    run_stage("prune", paths.PRUNED_DIR, {"stage_code": own_code(stage_prune),
        "source": sha256_file(src), "images": data.sha, "budget": args.budget, "margin": args.margin,
        "code": code_hash("prune", "report", "manifest", "sanity", *MEASURE_CODE)}, [out, man, log_p], build)
    return out


def training_photos(args, split: str = "choose") -> tuple:
    """What training may learn from: a labeled split (``choose``, or its ``fit`` half for a stage
    that picks among its results on the other half; never the confirm classes) or the calibration
    folder, plus the bundled photos, unlabeled (-1)."""
    from rtinfer import labeled_photos
    if args.labeled_dir:
        files, labels = labeled_photos.find(args.labeled_dir)
        files, labels = labeled_photos.select(files, labels, split)
        labels = [int(y) for y in labels]
    else:
        files = images.folder_images(args.calib_dir) if args.calib_dir else []
        labels = [-1] * len(files)
    bundled = images.packaged_photos()
    return list(files) + bundled, labels + [-1] * len(bundled)


def distill_options(args, keep: float = 1.0, plan: dict | None = None):
    from .train.distill import Options
    return Options(keep=keep, plan=plan, steps=args.distill_steps, size=args.distill_size,
                   views=args.distill_views, alpha=args.distill_alpha, lr=args.distill_lr, mix=args.distill_mix,
                   time_cap_s=args.distill_minutes * 60, teacher=args.distill_teacher)


def stage_distill(src: Path, data: Data, args, weights_sha: str) -> Path | None:
    """Far pruning + distillation: the pruning curve after distillation, and the point within budget.

    One sub-stage per point (pruned, refitted, distilled on the teacher's cached answers, scored),
    then stage `distill` measures them side by side and picks, among the distilled and the
    only-refitted students (training can also make a student worse: measured), the one with the most
    FLOPs removed within budget on the pick classes. Returns the file the CPU stage judges: the
    pick, or (none within budget) the most accurate on the pick classes, which its rule rejects."""
    if args.distill_steps <= 0:
        print("[distill] off (--distill-steps 0)", flush=True)
        return None
    d = paths.BUILD / "distill"
    opts0 = distill_options(args, 1.0)
    teacher, teacher_size, pool_dir = src, paths.IMAGE_SIZE, "pool"
    if opts0.teacher == "lite2":   # the cascade's big model, exported (FP32 NCHW, 260 px) by stage big
        from . import big_model
        stage_big(args)
        teacher, teacher_size, pool_dir = paths.BUILD / "big" / "source.onnx", big_model.SIZE, "pool-lite2"
    pool_p = d / pool_dir / "pool.npz"
    files, labels = training_photos(args, "fit")
    pool_inputs = {"source": sha256_file(teacher), "photos": images.source_fingerprint(files), "labels": labels,
                   "views": opts0.views, "size": opts0.size, "seed": opts0.seed, "imaging": _imaging_hash(),
                   "code": code_hash("evaluate", "runtime", "train/teacher", "train/augment")}
    if teacher_size != paths.IMAGE_SIZE:
        pool_inputs["teacher_size"] = teacher_size
    from .train import distill
    run_stage("distill_pool", pool_p.parent, pool_inputs, [pool_p],
              lambda: distill.make_pool(files, labels, teacher, opts0, pool_p, teacher_size))
    specs = distill_points(args)
    points = {}
    for i, (name, spec) in enumerate(specs.items()):
        print(f"[distill] curve point {i + 1}/{len(specs)}: {name}", flush=True)
        points[name] = stage_distill_point(src, data, args, name, spec, pool_p,
                                           d / name.replace(" ", "-").replace("%", "pct"))

    out, man, log_p, png = d / "model.onnx", d / "manifest.json", d / "distill_log.json", d / "curve.png"
    inputs = {"stage_code": own_code(stage_distill), "images": data.sha, "budget": args.budget,
              "points": {k: [sha256_file(p), sha256_file(p.with_name("start.onnx"))] for k, p in points.items()},
              "code": code_hash("train/distill", "throughput", "report", *MEASURE_CODE)}

    def build():
        import shutil

        from . import report, throughput
        rows = [json.loads(p.with_name("point_log.json").read_text()) for p in points.values()]
        print(f"[distill] measuring {len(rows)} points and the original side by side (batch 1 and 8)", flush=True)
        speed = throughput.measure({"original": src, **points})
        cands = []
        for row, (k, p) in zip(rows, points.items()):
            row["speed"] = speed[k]
            row["speedup_b1"] = speed[k]["b1"] / speed["original"]["b1"]
            row["speedup_b8"] = speed[k]["b8"] / speed["original"]["b8"]
            for trained, path, sc in ((True, p, row), (False, p.with_name("start.onnx"), row["before_training"])):
                cands.append({"point": k, "trained": trained, "file": str(path.relative_to(d)),
                              "flops_reduction": row["flops_reduction"], "pick": sc["pick"], "confirm": sc["confirm"],
                              "speedup_b1": row["speedup_b1"], "speedup_b8": row["speedup_b8"]})
        picked = distill.pick_point(cands, args.budget)
        if picked is None:
            picked_or_best = max(range(len(cands)), key=lambda i: cands[i]["pick"]["quality"])
        else:
            picked_or_best = picked
        handed = cands[picked_or_best]
        shutil.copyfile(d / handed["file"], out)
        log = {"points": rows, "candidates": cands, "original_speed": speed["original"], "budget": args.budget,
               "pick_basis": data.pick[2], "picked": cands[picked] if picked is not None else None,
               "handed_to_cpu": handed,
               "rule": "among every point, distilled or only pruned + refitted, the most FLOPs removed with quality "
                       ">= budget on the pick split; none: the most accurate there goes to the CPU stage, whose rule "
                       "rejects it"}
        log_p.write_text(json.dumps(log, indent=2, default=str) + "\n")
        report.distill_curve_chart(log, png)
        row = rows[list(points).index(handed["point"])]
        write_manifest(out, man, source_weights_sha256=weights_sha, precision="fp32",
                       variant="pruned-distilled" if handed["trained"] else "pruned-refit",
                       figures=score_figures(handed["confirm"]) | {
                           "gflops": row["gflops"], "params": row["params"],
                           "flops_reduction": handed["flops_reduction"],
                           "speedup_b1": handed["speedup_b1"], "speedup_b8": handed["speedup_b8"]},
                       extra={"options": row["options"], "trained": handed["trained"], "steps_done": row["steps_done"],
                              "log": log_p.name, "within_budget": picked is not None})
        for c in cands:
            print(f"[distill] {distill.describe(c)}: FLOPs -{c['flops_reduction']:.1%}, pick quality "
                  f"{c['pick']['quality']:.3f}, confirm {top1_cell(c['confirm'])}, batch 8 x{c['speedup_b8']:.2f}",
                  flush=True)
        print(f"[distill] picked: {distill.describe(log['picked'])}; curve in {png}", flush=True)

    run_stage("distill", d, inputs, [out, man, log_p, png], build)
    return out


def distill_points(args) -> dict:
    """The curve's points, by name: for each FLOPs target the plan of the prune stage's sensitivity
    sweep nearest to it (cuts where the model minds least, whole residual blocks included), and a
    uniform fraction per block for each --distill-keep (for comparison)."""
    sweep = json.loads((paths.PRUNED_DIR / "prune_log.json").read_text())["curve"]
    specs = {}
    for target in sorted(set(args.distill_flops)):
        c = min(sweep, key=lambda c: (abs(c["flops_reduction"] - target), c["flops_reduction"]))
        specs.setdefault(f"plan {c['flops_reduction']:.1%}", {"plan": c["plan"]})
    for keep in sorted(set(args.distill_keep), reverse=True):
        specs[f"keep {keep:g}"] = {"keep": keep}
    return specs


def stage_distill_point(src: Path, data: Data, args, name: str, spec: dict, pool_p: Path, d: Path) -> Path:
    """One point of the curve: prune, refit, distil, export, score before and after training."""
    opts = distill_options(args, **spec)
    out, log_p = d / "model.onnx", d / "point_log.json"
    inputs = {"stage_code": own_code(stage_distill_point), "pool": sha256_file(pool_p), "images": data.sha,
              "options": opts.key(), "code": code_hash(
                  "graph_clean", "source_model", "manifest", "train/student", "train/loss", "train/loop",
                  "train/export", "train/distill", "train/augment", *MEASURE_CODE)}

    def build():
        from .cost import summary
        from .train import distill
        from .train.teacher import load_pool
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]  # resume only the same run
        log = distill.run(load_pool(pool_p), out, opts, ckpt=d / f"ckpt-{key}.pt")
        log["point"] = name
        start = out.with_name("start.onnx")
        pick_x, pick_ref, _ = data.pick

        def scores(path):
            return {"pick": evaluate.score(path, pick_x, pick_ref),
                    "confirm": evaluate.score(path, data.eval, data.eval_ref),
                    "choose": evaluate.score(path, data.calib, data.search_ref)}

        log.update(scores(out), before_training=scores(start))
        base, now = summary(src), summary(out)
        log.update(flops_reduction=1 - now["macs"] / base["macs"], gflops=now["gflops"], params=now["params"])
        for stale in d.glob("ckpt-*.pt"):   # done: checkpoints only serve an interrupted run
            stale.unlink()
        hist = log.pop("history")
        log["loss_every_10"] = [float(np.mean(hist[i:i + 10])) for i in range(0, len(hist), 10)]
        log_p.write_text(json.dumps(log, indent=2, default=str) + "\n")
        check_sanity(out)
        for split in ("pick", "confirm"):
            print(f"[distill] {name}, {split}: pruned {top1_cell(log['before_training'][split])} -> distilled "
                  f"{top1_cell(log[split])}", flush=True)
        print(f"[distill] {name}: FLOPs -{log['flops_reduction']:.1%}, {log['steps_done']}/{opts.steps} steps "
              f"in {log['seconds']:.0f} s", flush=True)

    run_stage(f"distill {name}", d, inputs, [out, out.with_name("start.onnx"), log_p], build)
    return out


def qat_options(args, symmetric: bool):
    from .train.qat import Options
    return Options(steps=args.qat_steps, size=args.qat_size, lr=args.qat_lr, symmetric=symmetric,
                   reduce_range=not symmetric, time_cap_s=args.qat_minutes * 60)


QAT_FLAVOURS = ("cpu", "tensorrt")


def stage_qat(src: Path, data: Data, args, weights_sha: str) -> dict | None:
    """Quantization-aware training of the original model, one run per flavour: CPU (uint8 activations,
    7-bit weights, which ORT's u8s8 kernels need without VNNI) and TensorRT (symmetric int8). Each is
    exported FP32 and quantized by ORT's quantizer (nearest rounding, MinMax on the choose split), next
    to the same flavour's post-training INT8 of the original, on both splits: the trained classes
    (choose) and the never-seen ones (confirm). The CPU flavour's PTQ files (ptq7-*) are CPU
    candidates too, so QAT is installed only if it beats plain 7-bit-weight PTQ."""
    if args.qat_steps <= 0:
        print("[qat] off (--qat-steps 0)", flush=True)
        return None
    from . import quantize
    d = paths.BUILD / "qat"
    pool_p = d / "pool" / "pool.npz"
    files, labels = training_photos(args)
    opts = {"cpu": qat_options(args, False), "tensorrt": qat_options(args, True)}
    flavors = {"cpu": quantize.CPU_7BIT, "tensorrt": quantize.TENSORRT}
    base = opts["cpu"]
    pool_inputs = {"source": sha256_file(src), "photos": images.source_fingerprint(files), "labels": labels,
                   "views": base.views, "size": base.size, "seed": base.seed, "imaging": _imaging_hash(),
                   "code": code_hash("evaluate", "runtime", "train/teacher", "train/augment")}
    from .train import export, qat, teacher
    run_stage("qat_pool", pool_p.parent, pool_inputs, [pool_p],
              lambda: teacher.build_pool(files, labels, src, base.views, base.size, base.seed, pool_p))
    files_out = {"cpu-full": d / "cpu_full.onnx", "cpu-ends": d / "cpu_ends.onnx", "tensorrt": d / "tensorrt_qdq.onnx",
                 "ptq7-full": d / "ptq7_cpu_full.onnx", "ptq7-ends": d / "ptq7_cpu_ends.onnx"}
    log_p, man = d / "qat_log.json", d / "manifest.json"
    inputs = {"stage_code": own_code(stage_qat), "pool": sha256_file(pool_p), "images": data.sha,
              "options": {k: o.key() for k, o in opts.items()}, "code": code_hash(
                  "graph_clean", "source_model", "manifest", "quantize", "train/student", "train/loss",
                  "train/loop", "train/export", "train/qat", "train/augment", *MEASURE_CODE)}

    def build():
        from . import fidelity, runtime
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]  # resume only the same run
        work = d / "work"
        work.mkdir(parents=True, exist_ok=True)
        log = {"flavours": {}}
        splits = {"confirm": (data.eval, data.eval_ref), "choose": (data.calib, data.search_ref)}

        def scores(path, level="all"):
            sess = runtime.session(path, level=level)
            return {k: fidelity.compare(ref.logits, runtime.logits(sess, x), ref.labels)
                    for k, (x, ref) in splits.items()}

        for name in QAT_FLAVOURS:
            o, flavor = opts[name], flavors[name]
            pool = teacher.load_pool(pool_p)
            model, tlog = qat.run(pool, data.calib, o, ckpt=d / f"ckpt-{name}-{key}.pt", check_x=data.eval)
            fp32 = export.to_onnx(model, work / f"{name}_trained_fp32.onnx")
            kinds = {"full": ()} if name == "tensorrt" else {"full": (), "ends": tuple(quantize.ends_nodes(fp32))}
            flog = {"options": tlog["options"], "steps_done": tlog["steps_done"], "seconds": tlog["seconds"],
                    "loss_first": tlog["loss_first"], "loss_last": tlog["loss_last"], "kinds": {}}
            for kind, exclude in kinds.items():
                qat_file = files_out["tensorrt"] if name == "tensorrt" else files_out[f"cpu-{kind}"]
                ptq_file = files_out[f"ptq7-{kind}"] if name == "cpu" else work / f"ptq_{name}_{kind}.onnx"
                for base_model, out, cache in ((fp32, qat_file, work / f"cal_{name}_qat"),
                                               (src, ptq_file, work / f"cal_{name}_ptq")):
                    cache.mkdir(exist_ok=True)
                    for stale in cache.glob("calib_*.json"):
                        stale.unlink()
                    quantize.quantize(base_model, out, data.calib, "minmax", flavor, exclude, cache)
                k = {"qat": scores(qat_file), "ptq": scores(ptq_file),
                     "fakequant_vs_file": fidelity.compare(tlog["fakequant_logits"], evaluate.run(qat_file, data.eval))
                     if kind == "full" else None}
                if name == "tensorrt":   # TensorRT accumulates in int32: ORT without its CPU integer kernels
                    k["qat_reference_math"] = scores(qat_file, "basic")
                    k["ptq_reference_math"] = scores(ptq_file, "basic")
                flog["kinds"][kind] = k
                for split in ("choose", "confirm"):
                    print(f"[qat] {name} {kind} INT8, {split}: PTQ -> QAT top-1 {top1_cell(k['ptq'][split])} -> "
                          f"{top1_cell(k['qat'][split])}", flush=True)
            log["flavours"][name] = flog
        wrap_file(files_out["tensorrt"], files_out["tensorrt"])
        onnx.checker.check_model(onnx.load(str(files_out["tensorrt"])), full_check=True)
        for stale in d.glob("ckpt-*.pt"):   # done: checkpoints only serve an interrupted run
            stale.unlink()
        log_p.write_text(json.dumps(log, indent=2, default=str) + "\n")
        trt = log["flavours"]["tensorrt"]["kinds"]["full"]
        write_manifest(files_out["tensorrt"], man, source_weights_sha256=weights_sha,
                       precision="int8 Q/DQ symmetric, all layers, quantization-aware trained",
                       variant="int8-qdq-qat-for-tensorrt",
                       figures=score_figures(evaluate.score(files_out["tensorrt"], data.eval, data.eval_ref)),
                       extra={"reference_math_confirm": trt["qat_reference_math"]["confirm"], "log": log_p.name,
                              "target": "TensorRT strongly typed network; fidelity measured with ONNX Runtime CPU"})

    run_stage("qat", d, inputs, [*files_out.values(), log_p, man], build)
    return files_out


def qat_candidates(qat_files: dict) -> dict:
    """The qat stage's CPU files as CPU-variant candidates: name -> (file, precision)."""
    ends = ", first and last layers fp32"
    return {"qat-int8-full": (qat_files["cpu-full"], "int8, quantization-aware trained, 7-bit weights"),
            "qat-int8-ends": (qat_files["cpu-ends"], "int8, quantization-aware trained, 7-bit weights" + ends),
            "ptq7-int8-full": (qat_files["ptq7-full"], "int8, 7-bit weights (post-training, nearest)"),
            "ptq7-int8-ends": (qat_files["ptq7-ends"], "int8, 7-bit weights (post-training, nearest)" + ends)}


def stage_cpu(src: Path, pruned: Path, data: Data, args, weights_sha: str, distilled: Path | None = None,
              qat_files: dict | None = None) -> Path:
    out, man, log_p = paths.CPU_DIR / "model.onnx", paths.CPU_DIR / "manifest.json", paths.CPU_DIR / "cpu_log.json"

    def build():
        from . import cpu_variant
        log = cpu_variant.build(src, pruned, paths.CPU_DIR, data.calib, data.search, data.search_ref,
                                data.eval, data.eval_ref, args.budget, args.margin, tuple(args.calib_methods),
                                data.scan_n, ("pruned", "unpruned") if args.int8_from_unpruned else ("pruned",),
                                extra_fp32={"distilled-fp32": distilled} if distilled else None,
                                extra_int8=qat_candidates(qat_files) if qat_files else None)
        wrap_file(out, out)
        c = log["candidates"][log["chosen"]]
        q = log["quantization"]
        import onnxruntime
        extra = {"built_from_pruned_sha256": sha256_file(pruned), "log": log_p.name,
                 "optimized_offline_with": f"onnxruntime {onnxruntime.__version__} (extended level; "
                                           "load with this ORT version)"}
        if log["chosen"].startswith(("qat-", "ptq7-")):   # from the qat stage: the original, 7-bit weights
            extra.update({"built_from": "unpruned source", "calibration_method": "minmax",
                          "weight_rounding": "nearest, 7-bit weights (ORT reduce_range)" + (
                              ", quantization-aware trained (qat/qat_log.json)"
                              if log["chosen"].startswith("qat-") else "")})
        elif "int8" in c["precision"]:
            extra.update({"built_from": "unpruned source" if log["chosen"].startswith("unpruned") else "pruned",
                          "calibration_method": q["method"], "weight_rounding": q["rounding"],
                          "int8_layers": q["n_quantized"], "layers": q["n_layers"]})
        write_manifest(out, man, source_weights_sha256=weights_sha, precision=c["precision"],
                       variant=log["chosen"], figures=score_figures(c) | {k: c[k] for k in (
                           "b1", "b8", "speedup_b1", "speedup_b8", "gflops", "params", "int8_mac_share")}
                       | {"budget": args.budget},
                       extra=extra)

    run_stage("cpu", paths.CPU_DIR, {"stage_code": own_code(stage_cpu),
        "source": sha256_file(src), "pruned": sha256_file(pruned), "images": data.sha, "budget": args.budget,
        "margin": args.margin, "methods": args.calib_methods, "int8_from_unpruned": args.int8_from_unpruned,
        "distilled": sha256_file(distilled) if distilled else None,
        "qat": {k: sha256_file(v) for k, v in qat_files.items()} if qat_files else None,
        "code": code_hash("cpu_variant", "quantize", "gptq", "ort_offline", "throughput", "sanity", "preprocess",
                          "manifest", *MEASURE_CODE)}, [out, man, log_p], build)
    return out


def stage_fp16(src: Path, pruned: Path, data: Data, args, weights_sha: str) -> Path:
    out, man = paths.FP16_DIR / "model.onnx", paths.FP16_DIR / "manifest.json"

    def build():
        from . import fp16
        base = pruned
        log = fp16.build(pruned, out, data.eval, data.eval_ref, args.budget)
        if not log["meets_budget"]:
            print("  [fp16] the pruned model in FP16 misses the budget; using the unpruned source", flush=True)
            base, log = src, fp16.build(src, out, data.eval, data.eval_ref, args.budget)
        wrap_file(out, out)
        final = evaluate.score(out, data.eval, data.eval_ref)
        write_manifest(out, man, source_weights_sha256=weights_sha, precision="fp16 (input uint8, logits fp32)",
                       variant="fp16-for-tensorrt", figures=score_figures(final) | {"budget": args.budget},
                       extra={"fp32_ops": log["fp32_ops"], "built_from": str(base), "tried": log["tried"],
                              "target": "TensorRT strongly typed network; fidelity measured with ONNX Runtime CPU"})

    run_stage("fp16", paths.FP16_DIR, {"stage_code": own_code(stage_fp16),
        "source": sha256_file(src), "pruned": sha256_file(pruned), "images": data.sha, "budget": args.budget,
        "code": code_hash("fp16", "manifest", *MEASURE_CODE)}, [out, man], build)
    return out


def stage_int8_trt(pruned: Path, data: Data, args, weights_sha: str) -> Path:
    out, man, log_p = (paths.INT8_TRT_DIR / "model.onnx", paths.INT8_TRT_DIR / "manifest.json",
                       paths.INT8_TRT_DIR / "quant_log.json")

    def build():
        from . import quantize
        log, _ = quantize.accuracy_aware(pruned, paths.INT8_TRT_DIR / "work", data.calib, data.search,
                                      data.search_ref, data.eval, data.eval_ref, args.budget, args.margin,
                                      quantize.TENSORRT, methods=tuple(args.calib_methods), scan_n=data.scan_n)
        Path(log["model"]).replace(out)
        wrap_file(out, out)
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        score = evaluate.score(out, data.eval, data.eval_ref)
        log["ends_fp32"]["eval"] = evaluate.score(log["ends_fp32"]["model"], data.eval, data.eval_ref)
        log["final"] = score
        log_p.write_text(json.dumps(log, indent=2, default=str) + "\n")
        write_manifest(out, man, source_weights_sha256=weights_sha,
                       precision=f"int8 Q/DQ symmetric ({log['n_quantized']}/{log['n_layers']} layers INT8)",
                       variant="int8-qdq-for-tensorrt", figures=score_figures(score) | {"budget": args.budget},
                       extra={"calibration_method": log["method"], "weight_rounding": log["rounding"],
                              "activations": "int8 symmetric (zero point 0)",
                              "weights": "int8 symmetric per-channel", "bias": "fp32",
                              "built_from_pruned_sha256": sha256_file(pruned), "log": log_p.name,
                              "target": "TensorRT strongly typed network; fidelity measured with ONNX Runtime CPU"})
        print(f"[int8_trt] {log['n_quantized']}/{log['n_layers']} layers INT8, eval quality "
              f"{score['quality']:.2%} ({score['quality_basis']})", flush=True)

    run_stage("int8_trt", paths.INT8_TRT_DIR, {"stage_code": own_code(stage_int8_trt),
        "pruned": sha256_file(pruned), "images": data.sha, "budget": args.budget, "margin": args.margin,
        "methods": args.calib_methods, "code": code_hash("quantize", "gptq", "manifest", *MEASURE_CODE)},
        [out, man, log_p], build)
    return out


def report_candidates(src, pruned, cpu, fp16, int8_trt, qat_trt: Path | None = None) -> tuple:
    cpu_log = json.loads((paths.CPU_DIR / "cpu_log.json").read_text())
    chosen = cpu_log["chosen"]
    cands = {"original-fp32": src, "pruned-fp32": pruned, "cpu-variant": cpu}
    graphs = {"cpu-variant": Path(cpu_log["candidates"][chosen]["graph"])}
    notes = {"original-fp32": "reference", "pruned-fp32": "structured pruning",
             "cpu-variant": f"installed: {chosen}"}
    for name, c in cpu_log["candidates"].items():
        if name != chosen:
            cands[name] = Path(c["path"])
            graphs[name] = Path(c["graph"])
            notes[name] = "candidate, " + ("within budget" if c["meets_budget"] else "rejected: budget")
    cands["fp16-trt-onnx"], notes["fp16-trt-onnx"] = fp16, "GPU-targeted; CPU run = fidelity proxy"
    cands["int8-trt-qdq"], notes["int8-trt-qdq"] = int8_trt, "GPU-targeted; CPU run = fidelity proxy"
    if qat_trt is not None:
        cands["int8-trt-qdq-qat"] = qat_trt
        notes["int8-trt-qdq-qat"] = "GPU-targeted, all INT8, QAT; CPU integer kernels (qat_log: TensorRT's math)"
    return cands, notes, graphs


def qat_section(log: dict) -> str:
    """Markdown: post-training INT8 of the original -> QAT, same flavour and placement, on the trained
    classes (choose) and the never-seen ones (confirm)."""
    out = ["\n## Quantization-aware training (top-1, PTQ of the original -> QAT, same flavour)\n",
           "| flavour | INT8 layers | ORT run | choose (trained classes) | confirm (held-out classes) | steps | s |",
           "|---|---|---|---|---|---|---|"]
    for name, f in log["flavours"].items():
        for kind, k in f["kinds"].items():
            runs = [("integer kernels", "ptq", "qat")]
            if "qat_reference_math" in k:
                runs.append(("reference math", "ptq_reference_math", "qat_reference_math"))
            for run, b, a in runs:
                out.append(f"| {name} | {kind} | {run} | {top1_cell(k[b]['choose'])} -> {top1_cell(k[a]['choose'])} | "
                           f"{top1_cell(k[b]['confirm'])} -> {top1_cell(k[a]['confirm'])} | {f['steps_done']} | "
                           f"{f['seconds']:.0f} |")
    return "\n".join(out) + "\n"


def distill_section(log: dict) -> str:
    """Markdown: the pruning curve after distillation, each point refit only -> distilled."""
    from .train.distill import describe
    out = ["\n## Pruning curve after distillation (top-1; pick: choose classes never trained on)\n",
           f"Picked: {describe(log['picked'])} (budget {log['budget']:.3f} on the pick split; {log['pick_basis']}).\n",
           "| point | FLOPs removed | speed-up b1 / b8 | pick: refit -> distilled | confirm: refit -> distilled "
           "| steps |",
           "|---|---|---|---|---|---|"]
    for p in sorted(log["points"], key=lambda p: p["flops_reduction"]):
        b = p["before_training"]
        out.append(f"| {p['point']} | {p['flops_reduction']:.1%} | {p['speedup_b1']:.2f}x / {p['speedup_b8']:.2f}x | "
                   f"{top1_cell(b['pick'])} -> {top1_cell(p['pick'])} | "
                   f"{top1_cell(b['confirm'])} -> {top1_cell(p['confirm'])} | "
                   f"{p['steps_done']} |")
    return "\n".join(out) + "\n\n![distillation](distill_curve.png)\n"


def stage_report(src, pruned, cpu, fp16, int8_trt, data: Data, args, qat_trt: Path | None = None,
                 distilled: Path | None = None) -> None:
    outs = [paths.REPORT_DIR / f"report.{e}" for e in ("json", "md", "png")]

    def build():
        import shutil

        from . import report
        cands, notes, graphs = report_candidates(src, pruned, cpu, fp16, int8_trt, qat_trt)
        rows = report.measure(cands, data.eval, data.eval_ref, notes, graphs=graphs)
        prune_log = json.loads((paths.PRUNED_DIR / "prune_log.json").read_text())
        qlogs = {f"cpu from {k} (uint8 asym.)": v
                 for k, v in json.loads((paths.CPU_DIR / "cpu_log.json").read_text())["quantization_all"].items()}
        qlogs["tensorrt from pruned (int8 sym.)"] = json.loads((paths.INT8_TRT_DIR / "quant_log.json").read_text())
        report.write(rows, paths.REPORT_DIR, "report", "EfficientNet-Lite0 variants vs original FP32", args.budget,
                     extra={"prune_curve": prune_log["curve"]})
        report.prune_curve_chart(prune_log, paths.REPORT_DIR / "prune_curve.png")
        report.quant_curve_chart(qlogs, paths.REPORT_DIR / "quant_curve.png", args.budget)
        with open(paths.REPORT_DIR / "report.md", "a") as f:
            f.write("\n## Pruning curve (FLOPs vs agreement)\n\n"
                    "| KL/MAC threshold | FLOPs removed | search top-1 | eval top-1 |\n|---|---|---|---|\n")
            for p in sorted(prune_log["curve"], key=lambda p: p["flops_reduction"]):
                f.write(f"| {p['threshold']:.3g} | {p['flops_reduction']:.1%} | {p['search']['top1_agreement']:.2%} "
                        f"| {p['eval']['top1_agreement']:.2%} |\n")
            if qat_trt is not None:
                f.write(qat_section(json.loads((qat_trt.parent / "qat_log.json").read_text())))
            if distilled is not None:
                shutil.copyfile(distilled.with_name("curve.png"), paths.REPORT_DIR / "distill_curve.png")
                f.write(distill_section(json.loads(distilled.with_name("distill_log.json").read_text())))
            f.write("\n![variants](report.png)\n![pruning](prune_curve.png)\n![int8](quant_curve.png)\n")
        print("[report] side by side on the evaluation split:", flush=True)
        report.console(rows)
        print(f"[report] {paths.REPORT_DIR / 'report.md'} (+ .json, .png, prune_curve.png, quant_curve.png)",
              flush=True)

    run_stage("report", paths.REPORT_DIR, {"stage_code": own_code(stage_report),
        "artifacts": [sha256_file(p) for p in (src, pruned, cpu, fp16, int8_trt) + ((qat_trt,) if qat_trt else ())],
        "distill_log": sha256_file(distilled.with_name("distill_log.json")) if distilled else None,
        "images": data.sha,
        "budget": args.budget, "code": code_hash("report", "throughput", "__main__", *MEASURE_CODE)}, outs, build)


def stage_install(artifact: Path, manifest: Path, weights_sha: str) -> None:
    m = json.loads(manifest.read_text())
    figures = m.get("figures", {})
    extra = {k: m[k] for k in ("built_from", "calibration_method", "weight_rounding", "int8_layers", "layers",
                               "optimized_offline_with") if k in m}
    log = json.loads((manifest.parent / "cpu_log.json").read_text())
    portable = Path(log["candidates"][log["chosen"]]["graph"])  # the chosen candidate before ORT's fusions
    run_stage("install", paths.BUILD / "install", {"stage_code": own_code(stage_install),
        "artifact": sha256_file(artifact), "portable": sha256_file(portable), "manifest": sha256_file(manifest),
        "code": code_hash("install", "manifest", "sanity", "preprocess", "uint8_front")},
        [INSTALLED_MODEL, INSTALLED_PORTABLE, INSTALLED_MANIFEST],
        lambda: install(artifact, portable=portable, weights_sha=weights_sha, precision=m["precision"],
                        variant=m["variant"], figures=figures, extra=extra))


def stage_big(args) -> None:
    """EfficientNet-Lite2 for the cascade's cloud leg (build_engines.big_model): export, FP16 ONNX, figures."""
    from rtinfer import labeled_photos

    from . import big_model
    if args.labeled_dir:
        files, labels = labeled_photos.find(args.labeled_dir)
        splits = {s: labeled_photos.select(files, labels, s) for s in ("choose", "confirm")}
    else:
        photos = images.packaged_photos()
        splits = {"choose": (photos, None), "confirm": (photos, None)}
    d = paths.BUILD / "big"
    outs = [big_model.MODEL, big_model.MANIFEST, d / "fp16.onnx", d / "logits_choose.npz", d / "logits_confirm.npz"]

    def build():
        figures = big_model.build(d, splits, args.budget)
        for split in ("choose", "confirm"):
            f = figures[split]
            acc = f"top-1 {f['top1_accuracy']:.1%}" if "top1_accuracy" in f else "unlabeled"
            print(f"[big] Lite2 {split}: {acc}, agreement with PyTorch {f['top1_agreement']:.1%}, "
                  f"KL {f['mean_kl']:.1e}", flush=True)

    run_stage("big", d, {"stage_code": own_code(stage_big), "weights": source_model.weights_sha256("lite2"),
        "photos": {s: images.source_fingerprint(f) for s, (f, _) in splits.items()}, "imaging": _imaging_hash(),
        "budget": args.budget, "code": code_hash("big_model", "source_model", "graph_clean", "fp16", "manifest",
                                                 "sanity", "uint8_front", *MEASURE_CODE)}, outs, build)


def quick_install(src: Path, weights_sha: str) -> None:
    """`make engines-quick` (make demo, serve, ...): keep the installed variant if it is intact (a full build's, or an
    earlier plain export), else install the plain export; say which one is served (build_engines.installed)."""
    if installed.manifest() is None:
        install(src, portable=src, weights_sha=weights_sha, precision="fp32", variant=installed.QUICK_VARIANT,
                figures={}, extra={"note": "plain export installed by `make engines-quick` (build_engines --quick); "
                                           "`make engines` builds, measures and installs the optimized variant"})
    print(f"[quick] {installed.describe()}", flush=True)


def stage_tensorrt(fp16: Path, int8_trt: Path) -> None:
    try:
        from build_engines.tensorrt.engines import build_all
    except ImportError as e:
        print(f"[tensorrt] stage not available ({e}); TensorRT engines skipped", flush=True)
        return
    big = paths.BUILD / "big" / "fp16.onnx"  # the cascade's cloud classifier (stage big)
    build_all(fp16, int8_trt, paths.REPO, extra={"classifier_big_trt_fp16": ("fp16", big)} if big.exists() else None)


def _lock():
    """One build at a time: tests and other targets run `make engines` too; a second run waits, then finds it up to
    date."""
    import fcntl
    paths.BUILD.mkdir(parents=True, exist_ok=True)
    f = open(paths.BUILD / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("[engines] another build is running; waiting for it ...", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


def main(argv=None) -> None:
    args = cli.parse_args(argv)
    t0 = time.perf_counter()
    lock = _lock()
    weights_sha = source_model.weights_sha256()
    src = stage_source(weights_sha)
    if args.quick:
        quick_install(src, weights_sha)
        lock.close()
        return
    data = Data(src, stage_images(args), args.scan_n)
    pruned = stage_prune(src, data, args, weights_sha)
    distilled = stage_distill(src, data, args, weights_sha)
    qat_files = stage_qat(src, data, args, weights_sha)
    cpu = stage_cpu(src, pruned, data, args, weights_sha, distilled, qat_files)
    fp16 = stage_fp16(src, pruned, data, args, weights_sha)
    int8_trt = stage_int8_trt(pruned, data, args, weights_sha)
    stage_report(src, pruned, cpu, fp16, int8_trt, data, args, qat_files["tensorrt"] if qat_files else None, distilled)
    stage_install(cpu, paths.CPU_DIR / "manifest.json", weights_sha)
    stage_big(args)
    stage_tensorrt(fp16, int8_trt)
    print(f"[engines] finished in {time.perf_counter() - t0:.1f} s", flush=True)
    lock.close()


if __name__ == "__main__":
    main()
