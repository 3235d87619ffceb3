"""Sensitivity-driven structured pruning of EfficientNet-Lite0 on the ONNX graph (onnx-graphsurgeon).

Two kinds of cut, both found structurally in the graph (not by layer names):
- channel pruning inside an inverted-residual block: drop expanded channels from the
  expand 1x1 conv's output (weights + folded-BN bias), the matching depthwise filters and
  biases, and the project conv's input columns. Channels are ranked by a magnitude
  criterion, the energy each contributes to the project conv's output,
  ||W_proj[:, j]||_2 * std(a_j), with activation statistics from the calibration split.
  The project conv is then refitted by least squares on those statistics (the kept
  channels take over what the dropped ones carried, means go into the bias), which
  stands in for the fine-tuning that the classic recipe would do next;
- removal of a whole residual block (its Add then passes the skip input through).
The recipe: measure each block's sensitivity (KL to the original on the first images of
the search split)
at several pruning ratios and for removal, then for a sweep of thresholds on KL per MAC
saved, cut every block as far as it stays under the threshold; the budget picks the
threshold, and the sweep is the FLOPs-vs-agreement curve.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import cost, evaluate, runtime

RATIOS = (0.125, 0.25, 0.5, 0.75)   # fraction of a block's expanded channels removed


@dataclass
class Block:
    index: int
    expand: str            # node names
    depthwise: str
    project: str
    add: str | None        # residual Add, when the block has an identity skip
    activation: str        # tensor: depthwise output after ReLU6 (the project conv's input)
    width: int             # expanded channels


def _attr(node, name, default=None):
    return node.attrs.get(name, default)


def find_blocks(model: onnx.ModelProto) -> list[Block]:
    """Inverted-residual blocks with an expand conv: Conv1x1 -> Clip -> DWConv -> Clip -> Conv1x1 [-> Add]."""
    g = gs.import_onnx(model)
    blocks = []
    for dw in g.nodes:
        if dw.op != "Conv" or _attr(dw, "group", 1) == 1:
            continue
        try:
            act_in, act_out = dw.i(), dw.o()
            expand, project = act_in.i(), act_out.o()
        except IndexError:
            continue
        if (act_in.op != "Clip" or act_out.op != "Clip" or expand.op != "Conv" or project.op != "Conv"
                or list(_attr(expand, "kernel_shape", [0])) != [1, 1] or _attr(expand, "group", 1) != 1
                or len(act_out.outputs[0].outputs) != 1 or len(act_in.outputs[0].outputs) != 1
                or len(expand.outputs[0].outputs) != 1):
            continue
        add = None
        consumers = project.outputs[0].outputs
        if len(consumers) == 1 and consumers[0].op == "Add" and expand.inputs[0] in consumers[0].inputs:
            add = consumers[0].name
        blocks.append(Block(len(blocks), expand.name, dw.name, project.name, add, act_out.outputs[0].name,
                            int(dw.inputs[1].shape[0])))
    return blocks


def activation_stats(model_path: Path, blocks: list[Block], x: np.ndarray, batch: int = 8) -> dict:
    """Per block: mean and covariance of the project conv's input channels over all positions."""
    m = onnx.load(str(model_path))
    for b in blocks:
        m.graph.output.append(onnx.helper.make_tensor_value_info(b.activation, onnx.TensorProto.FLOAT, None))
    sess = runtime.session(m.SerializeToString())
    names = [b.activation for b in blocks]
    acc = {b.index: [0, np.zeros(b.width), np.zeros((b.width, b.width))] for b in blocks}
    for i in range(0, len(x), batch):
        outs = sess.run(names, {"input": x[i:i + batch]})
        for b, a in zip(blocks, outs):
            a = a.transpose(0, 2, 3, 1).reshape(-1, b.width).astype(np.float64)
            s = acc[b.index]
            s[0] += len(a)
            s[1] += a.sum(0)
            s[2] += a.T @ a
    stats = {}
    for k, (n, s1, s2) in acc.items():
        mean = s1 / n
        stats[k] = {"mean": mean, "cov": s2 / n - np.outer(mean, mean)}
    return stats


def _const(node, i) -> np.ndarray:
    return np.asarray(node.inputs[i].values)


def channel_ranking(graph: gs.Graph, block: Block, stats: dict) -> np.ndarray:
    """Channels of a block ordered from least to most important (magnitude criterion)."""
    proj = next(n for n in graph.nodes if n.name == block.project)
    w = _const(proj, 1)[:, :, 0, 0]
    std = np.sqrt(np.clip(np.diag(stats[block.index]["cov"]), 0, None))
    score = np.linalg.norm(w, axis=0) * std
    return np.argsort(score, kind="stable")


def _refit_project(w: np.ndarray, b: np.ndarray, keep: np.ndarray, st: dict) -> tuple:
    """Least-squares project weights on the kept channels: W' = W S[:,K] S[K,K]^-1, means into the bias."""
    cov, mean = st["cov"], st["mean"]
    skk = cov[np.ix_(keep, keep)]
    ridge = 1e-6 * (np.trace(skk) / max(len(keep), 1) + 1e-12)
    w2 = w @ cov[:, keep] @ np.linalg.inv(skk + ridge * np.eye(len(keep)))
    b2 = b + w @ mean - w2 @ mean[keep]
    return w2, b2


def apply(model: onnx.ModelProto, blocks: list[Block], plan: dict, stats: dict) -> onnx.ModelProto:
    """plan: block index -> number of channels to remove, or "remove" for the whole block.

    An empty plan (or 0 channels everywhere) returns the graph with its tensors untouched.
    """
    g = gs.import_onnx(model)
    nodes = {n.name: n for n in g.nodes}
    for blk in blocks:
        action = plan.get(blk.index, 0)
        if action == "remove":
            add = nodes[blk.add]
            skip = nodes[blk.expand].inputs[0]
            out = add.outputs[0]
            for consumer in list(out.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[i] = skip
            add.outputs.clear()
            continue
        drop = int(action)
        if drop <= 0:
            continue
        order = channel_ranking(g, blk, stats)
        keep = np.sort(order[drop:])
        exp, dw, proj = nodes[blk.expand], nodes[blk.depthwise], nodes[blk.project]
        for node in (exp, dw):
            node.inputs[1] = gs.Constant(node.inputs[1].name + "_pruned", _const(node, 1)[keep].copy())
            if len(node.inputs) > 2:
                node.inputs[2] = gs.Constant(node.inputs[2].name + "_pruned", _const(node, 2)[keep].copy())
        dw.attrs["group"] = int(len(keep))
        w = _const(proj, 1)[:, :, 0, 0].astype(np.float64)
        b = _const(proj, 2).astype(np.float64) if len(proj.inputs) > 2 else np.zeros(w.shape[0])
        w2, b2 = _refit_project(w, b, keep, stats[blk.index])
        proj.inputs[1] = gs.Constant(proj.inputs[1].name + "_pruned", w2.astype(np.float32)[:, :, None, None])
        bias = gs.Constant(proj.name + "_bias_pruned", b2.astype(np.float32))
        if len(proj.inputs) > 2:
            proj.inputs[2] = bias
        else:
            proj.inputs.append(bias)
        for t in (exp.outputs[0], dw.outputs[0], nodes[blk.depthwise].o().outputs[0], exp.o().outputs[0]):
            t.shape = None   # stale channel counts; shape inference fills them again
    g.cleanup().toposort()
    out = gs.export_onnx(g)
    return out


def validate(model: onnx.ModelProto) -> onnx.ModelProto:
    """checker (full) + shape inference; returns the model with inferred shapes."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)
    return inferred


def _options(blk: Block, base_macs: dict) -> list:
    """(action, MACs saved) for a block, mildest first; channel MACs scale with the kept width."""
    per_channel = sum(base_macs.get(n, 0) for n in (blk.expand, blk.depthwise)) / blk.width
    per_channel += base_macs.get(blk.project, 0) / blk.width
    opts = [(int(round(r * blk.width)), int(round(r * blk.width)) * per_channel) for r in RATIOS]
    if blk.add is not None:
        opts.append(("remove", per_channel * blk.width))
    return opts


def plan_for(threshold: float, sens: dict, blocks: list[Block], base_macs: dict) -> dict:
    """Each block cut as far as its KL per MAC saved stays within `threshold` (cheapest fidelity per FLOP)."""
    plan = {}
    for blk in blocks:
        s = sens[blk.index]
        for (action, saved), r in zip(_options(blk, base_macs), [str(r) for r in RATIOS] + ["remove"]):
            kl = s["remove"] if action == "remove" else s["ratios"][r]
            if kl / saved <= threshold:
                plan[blk.index] = action
            elif action != "remove":
                break
    return plan


def prune(source: Path, calib_x: np.ndarray, search_x: np.ndarray, search_ref: np.ndarray,
          eval_x: np.ndarray, eval_ref: np.ndarray, budget: float, margin: float, scan_n: int = 64) -> tuple:
    """Returns (pruned model, log with sensitivities, curve and the chosen plan)."""
    model = onnx.load(str(source))
    blocks = find_blocks(model)
    print(f"  [prune] {len(blocks)} inverted-residual blocks with expand conv, "
          f"{sum(b.add is not None for b in blocks)} with identity skip", flush=True)
    t0 = time.perf_counter()
    stats = activation_stats(source, blocks, calib_x)
    print(f"  [prune] activation statistics on {len(calib_x)} calibration images "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def kl(plan):
        return evaluate.score(apply(model, blocks, plan, stats).SerializeToString(), search_x[:scan_n],
                              search_ref[:scan_n])

    sens = {}
    t0 = time.perf_counter()
    for blk in blocks:
        s = {"ratios": {}}
        for r in RATIOS:
            s["ratios"][str(r)] = kl({blk.index: int(round(r * blk.width))})["mean_kl"]
        s["remove"] = kl({blk.index: "remove"})["mean_kl"] if blk.add else float("inf")
        sens[blk.index] = s
        print(f"  [prune] block {blk.index:2d} ({blk.width:4d} ch): KL at "
              + " ".join(f"{r:.0%} {s['ratios'][str(r)]:.4f}" for r in RATIOS)
              + (f", removed {s['remove']:.4f}" if blk.add else "")
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    node_macs = cost.node_macs(model)
    base_macs = sum(node_macs.values())
    per_mac = sorted(
        (s["remove"] if a == "remove" else s["ratios"][str(r)]) / saved
        for blk in blocks for s in [sens[blk.index]]
        for (a, saved), r in zip(_options(blk, node_macs), list(RATIOS) + ["remove"]))
    # one threshold per step of the cheapest-first ordering, thinned to ~16 points over the first 60 %
    idx = np.unique(np.linspace(0, int(0.6 * (len(per_mac) - 1)), 16).round().astype(int))
    thresholds = [per_mac[i] for i in idx]
    seen = []
    curve = []
    misses = 0
    best = {"plan": {}, "threshold": 0.0}
    for th in thresholds:
        plan = plan_for(th, sens, blocks, node_macs)
        if plan in seen:
            continue
        seen.append(plan)
        cand = apply(model, blocks, plan, stats)
        srch = evaluate.score(cand.SerializeToString(), search_x, search_ref)
        ev = evaluate.score(cand.SerializeToString(), eval_x, eval_ref)
        macs = cost.macs(cand)
        point = {"threshold": th, "macs": macs, "flops_reduction": 1 - macs / base_macs,
                 "search": srch, "eval": ev, "plan": {str(k): v for k, v in plan.items()}}
        curve.append(point)
        ok = srch["quality"] >= budget + margin and ev["quality"] >= budget
        print(f"  [prune] KL/MAC threshold {th:.3g}: FLOPs -{point['flops_reduction']:.1%}, search quality "
              f"{srch['quality']:.3f}, eval {ev['quality']:.3f} ({ev['quality_basis']})"
              f"{'  within budget' if ok else ''}", flush=True)
        if ok and (not best["plan"] or macs < best.get("macs", np.inf)):
            best = {"plan": plan, "threshold": th, "macs": macs}
        misses = misses + 1 if ev["quality"] < budget - 0.10 else 0
        if misses >= 2:
            break   # far past the budget: the rest of the curve is not worth the build time
    pruned = validate(apply(model, blocks, best["plan"], stats))
    log = {"budget": budget, "margin": margin, "ratios": list(RATIOS),
           "blocks": [b.__dict__ for b in blocks], "sensitivity": {str(k): v for k, v in sens.items()},
           "curve": curve, "chosen_threshold": best["threshold"],
           "chosen_plan": {str(k): v for k, v in best["plan"].items()}}
    return pruned, log
